"""NVIDIA's TensorRT diffusion demo conventions for the folder's UNet, and the engine-building recipe.

The demo (TensorRT's ``demo/Diffusion``) names the UNet output ``latent`` and feeds ``timestep`` as a scalar;
``--tensorrt-conventions`` rewrites the exported graph's interface to match: the output is renamed and the
scalar input is unsqueezed to the ``[1]`` the traced graph computes with (a ``Constant`` node holds the axes,
so the initializers and their digest are untouched, and so is the computation). diffusers'
``OnnxStableDiffusionPipeline`` feeds a ``[1]`` timestep, so a folder with these conventions is for TensorRT and
crdiff's own runner.

:func:`recipe` is the ``TENSORRT.md`` written into every folder: building a strongly typed engine (precision
from the ONNX file: bake with ``--dtype fp16``) with min/opt/max shapes around the baked resolution, with
``polygraphy`` or ``trtexec``. It has not been run on a GPU here; the file says so.
"""

from __future__ import annotations

from pathlib import Path

TRT_OUTPUT = "latent"
SCALAR_SOURCE = "timestep_1d"  # the [1] tensor the graph computes with, made from the scalar input


def apply_tensorrt_conventions(path: Path) -> None:
    """Rewrite the UNet graph at ``path`` in place: output ``out_sample`` -> ``latent``, ``timestep`` scalar."""
    import onnx
    from onnx import helper

    from crdiff_cli.exporters.onnx_graph import OUTPUT

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for node in graph.node:  # a graph without the POA switch: no If branches read the inputs
        node.input[:] = [SCALAR_SOURCE if name == "timestep" else name for name in node.input]
        node.output[:] = [TRT_OUTPUT if name == OUTPUT else name for name in node.output]
    for output in graph.output:
        if output.name == OUTPUT:
            output.name = TRT_OUTPUT
    timestep = next(i for i in graph.input if i.name == "timestep")
    timestep.type.tensor_type.shape.ClearField("dim")
    axes = helper.make_tensor("timestep_axes", onnx.TensorProto.INT64, [1], [0])
    graph.node.insert(0, helper.make_node("Constant", [], ["timestep_axes"], value=axes, name="timestep_axes"))
    graph.node.insert(1, helper.make_node("Unsqueeze", ["timestep", "timestep_axes"], [SCALAR_SOURCE],
                                          name="timestep_to_1d"))
    onnx.save_model(model, str(path))


def recipe(*, family: str, dtype: str, height: int, width: int, channels: int, scale: int, text_dim: int,
           added: dict[str, int] | None, conventions: bool) -> str:
    """``TENSORRT.md``: build commands with min/opt/max shapes around ``height`` x ``width`` (pixels; ``scale``
    pixels per latent pixel), the range the folder declares (:func:`~crdiff_cli.deploy.folder.resolution_range`)."""
    from crdiff_cli.deploy.folder import resolution_range

    limits = resolution_range(height, width)
    latent = (height // scale, width // scale)
    sizes = {"min": tuple(v // scale for v in limits["min"]), "opt": latent,
             "max": tuple(v // scale for v in limits["max"])}
    batches = {"min": 1, "opt": 2, "max": 8}  # 1: no guidance; guidance doubles the batch: 1-4 images

    def shapes(kind: str) -> list[tuple[str, list[int]]]:
        """The dynamic inputs' shapes (a scalar timestep is static: no profile entry)."""
        b, (h, w) = batches[kind], sizes[kind]
        parts = [("sample", [b, channels, h, w])] + ([] if conventions else [("timestep", [1])])
        parts.append(("encoder_hidden_states", [b, 77, text_dim]))
        return parts + [(name, [b, dim]) for name, dim in (added or {}).items()]

    poly = " \\\n         ".join(f"--trt-{kind}-shapes " + " ".join(f"{n}:[{','.join(map(str, d))}]"
                                                                    for n, d in shapes(kind))
                                 for kind in ("min", "opt", "max"))
    trtexec = " \\\n         ".join(f"--{kind}Shapes=" + ",".join(f"{n}:{'x'.join(map(str, d))}"
                                                                for n, d in shapes(kind))
                                    for kind in ("min", "opt", "max"))
    output = TRT_OUTPUT if conventions else "out_sample"
    timestep = ("a scalar (--tensorrt-conventions, as the demo feeds it)" if conventions else
                "a [1] tensor (bake with --tensorrt-conventions for the demo's scalar)")
    return f"""# Building a TensorRT engine from this folder's UNet

Status: **not yet run on a GPU.** These commands follow NVIDIA's TensorRT diffusion demo and the tools'
documentation; nobody has built or timed an engine from a crdiff folder yet.

The UNet graph is {family}, {dtype}, baked for {height}x{width} pixels (latent {latent[0]}x{latent[1]}).
A strongly typed engine takes its precision from the ONNX file: bake with `--dtype fp16` for an fp16 engine.
Its output is `{output}`; its timestep is {timestep}.

Shapes: batch 1-8 (1 image without guidance; guidance doubles 1-4 images), latent from half to 1.5x the baked size
(min {sizes["min"][0]}x{sizes["min"][1]}, opt {latent[0]}x{latent[1]}, max {sizes["max"][0]}x{sizes["max"][1]}): the
range the folder declares in crdiff.json (`resolution_range`, pixels), which crdiff's runner enforces too.

1. Optional, what the demo's optimizer does first (outputs stay identical; crdiff's tests check it): fold
   the in-graph masks into constants. This stores the pruned weights a second time (about 1.2-1.3x the
   weight bytes).

       python -c "import onnx, onnx_graphsurgeon as gs; g = gs.import_onnx(onnx.load('unet/model.onnx')); \\
       g.cleanup().toposort(); g.fold_constants().cleanup(); \\
       onnx.save(gs.export_onnx(g), 'unet/model_optimized.onnx', save_as_external_data=True, \\
       location='model_optimized.onnx_data')"

   The demo takes a ready graph at `<onnx-dir>/unet/model_optimized.onnx`.

2. Build the engine with polygraphy:

       polygraphy convert unet/model.onnx --convert-to trt --strongly-typed -o unet.plan \\
         {poly}

   or with trtexec:

       trtexec --onnx=unet/model.onnx --stronglyTyped --saveEngine=unet.plan \\
         {trtexec}

3. ONNX Runtime's TensorRT provider builds its own engine from the same file:
   `crdiff generate --pipeline . --provider tensorrt ...`.
"""
