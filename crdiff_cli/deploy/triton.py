"""A Triton Inference Server model repository made from a pipeline folder.

Layout (``NAME`` defaults to ``crdiff``)::

    REPO/NAME_unet/config.pbtxt             backend onnxruntime, inputs and outputs read from the graph
    REPO/NAME_unet/1/model.onnx (+ model.onnx_data)
    REPO/NAME_text_encoder/...  REPO/NAME_vae_decoder/...  (SDXL: NAME_text_encoder_2/)
    REPO/NAME/config.pbtxt                  backend python: prompt, seed, steps, ... -> image
    REPO/NAME/1/model.py                    the adapter (crdiff_cli.deploy.triton_backend)
    REPO/NAME/1/pipeline/                   the folder minus its ONNX files: crdiff.json, configs, tokenizers

The Python model runs the same torch-free runner as ``crdiff generate --pipeline`` and calls the ONNX models
through Triton (business logic scripting), so Triton places and schedules them on its own instances. The
folder's ``crdiff.json`` comes along unchanged and :func:`locate_in` maps its files to this layout, so the
digests it records are checked where the files now are. ``crdiff_triton.json`` lists every file crdiff wrote
(``--overwrite`` replaces nothing else) and each ONNX model's outputs and input types, which the Python model
casts its inputs to (an fp16 UNet still takes a float32 ``timestep``).

Each ONNX model's ``config.pbtxt`` has ``max_batch_size: 0`` (Triton does not batch requests: the graphs' batch
dimension is their own, and classifier-free guidance doubles it) and dims from the graph, ``-1`` where the
graph's are symbolic. A scalar input cannot be declared with ``max_batch_size: 0``, so a folder baked with the
TensorRT demo's scalar timestep has no Triton repository.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from crdiff_cli.deploy.folder import DATA_FILE, MODEL_FILE, RECORD, components, open_folder
from crdiff_cli.errors import CrdiffError
from crdiff_cli.storage.atomic import OutputKind, folder_files, lists_every_file

MARKER = "crdiff_triton.json"  # the repository's record: crdiff's files, each model's outputs and input types
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32"}  # from ONNX
# The Python model's request: prompt is required, the rest default as `crdiff generate` does (0 = the default).
REQUEST = (("prompt", "TYPE_STRING", False), ("negative_prompt", "TYPE_STRING", True), ("seed", "TYPE_INT64", True),
           ("steps", "TYPE_INT32", True), ("guidance", "TYPE_FP32", True), ("height", "TYPE_INT32", True),
           ("width", "TYPE_INT32", True), ("scheduler", "TYPE_STRING", True))
MODEL_PY = '''"""Triton Python-backend model: crdiff's torch-free runner, its ONNX models called through Triton."""

from crdiff_cli.deploy.triton_backend import TritonPythonModel  # noqa: F401
'''


REPOSITORY = OutputKind("Triton model repository", f"{MARKER} listing every file in it",
                        lambda path: lists_every_file(path, MARKER, "crdiff-triton/"), folder=True)


def model_name(name: str, component: str) -> str:
    return f"{name}_{component}"


def locate_in(repository: Path, name: str):
    """``locate`` for :func:`~crdiff_cli.deploy.folder.open_folder` on a repository's pipeline folder."""
    repository = Path(repository)

    def locate(file: str) -> Path:
        component, _, base = file.partition("/")
        if base in (MODEL_FILE, DATA_FILE):
            return repository / model_name(name, component) / "1" / base
        return repository / name / "1" / "pipeline" / file

    return locate


def pipeline_dir(repository: Path, name: str) -> Path:
    return Path(repository) / name / "1" / "pipeline"


def write_repository(folder: Path, out: Path, *, name: str = "crdiff", overwrite: bool = False) -> list[str]:
    """Write the Triton repository of the pipeline folder ``folder`` to ``out`` (staged, then renamed into
    place); files are hard-linked when the file system allows, else copied. Returns the model names."""
    from crdiff_cli.storage.atomic import atomic_path

    checked = open_folder(folder)
    if checked.record.get("unet_conventions") == "tensorrt":
        raise CrdiffError("a folder with the TensorRT demo's scalar timestep cannot be served by Triton "
                          "(max_batch_size 0 allows no scalar input); bake it without --tensorrt-conventions")
    models = [model_name(name, c) for c in components(checked.layout)] + [name]
    with atomic_path(out, overwrite, kind=REPOSITORY, directory=True) as tmp:
        locate = locate_in(tmp, name)
        for file in checked.record["files"]:
            _link(Path(folder) / file, locate(file))
        _link(Path(folder) / RECORD, locate(RECORD))
        for component in components(checked.layout):
            _write_text(tmp / model_name(name, component) / "config.pbtxt",
                        onnx_config(model_name(name, component), checked.model(component)))
        _write_text(tmp / name / "config.pbtxt", python_config(name))
        _write_text(tmp / name / "1" / "model.py", MODEL_PY)
        graphs = {model_name(name, c): graph_interface(checked.model(c)) for c in components(checked.layout)}
        record = {"format": "crdiff-triton/1", "name": name, "models": models,
                  "outputs": {model: outputs for model, (_, outputs) in graphs.items()},
                  "input_types": {model: inputs for model, (inputs, _) in graphs.items()},
                  "files": sorted(folder_files(tmp) | {MARKER})}
        _write_text(tmp / MARKER, json.dumps(record, indent=2) + "\n")
    return models


def graph_inputs(path: Path):
    """The graph of the ONNX model at ``path`` (weights not read) and its inputs (initializers left out)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return graph, [v for v in graph.input if v.name not in initializers]


def graph_interface(path: Path) -> tuple[dict[str, str], list[str]]:
    """The graph's inputs with their numpy dtype names, and its output names."""
    import onnx

    graph, inputs = graph_inputs(path)
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in inputs}
    return types, [o.name for o in graph.output]


def onnx_config(model: str, path: Path) -> str:
    """``config.pbtxt`` of an ONNX model: its inputs and outputs as the graph declares them."""
    graph, inputs = graph_inputs(path)
    lines = [f'name: "{model}"', 'backend: "onnxruntime"', "max_batch_size: 0"]
    for kind, values in (("input", inputs), ("output", graph.output)):
        entries = [_tensor_entry(v) for v in values]
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    return "\n".join(lines) + "\n"


def _tensor_entry(value) -> str:
    import onnx

    tensor = value.type.tensor_type
    dtype = TRITON_TYPES[onnx.TensorProto.DataType.Name(tensor.elem_type)]
    dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor.shape.dim]
    return f'  {{ name: "{value.name}" data_type: {dtype} dims: [ {", ".join(dims)} ] }}'


def python_config(name: str) -> str:
    """``config.pbtxt`` of the Python model: one request in, one ``[height, width, 3]`` uint8 image out."""
    entries = [f'  {{ name: "{n}" data_type: {t} dims: [ 1 ]{" optional: true" if optional else ""} }}'
               for n, t, optional in REQUEST]
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
        "input [\n" + ",\n".join(entries) + "\n]",
        'output [\n  { name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }\n]',
    ]) + "\n"


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
