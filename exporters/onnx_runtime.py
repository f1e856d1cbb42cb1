"""Running an ONNX artifact with ONNX Runtime: sessions (weights checked first), IO binding, and a ``unet``
adapter so diffusers' Stable Diffusion pipelines can call the graph.

Providers and session options are :mod:`crdiff_cli.deploy.sessions`' (shared with the torch-free runner),
including the mask-folding trade-off: by default ONNX Runtime folds each in-graph ``Where(|W| > t, W, 0)``
into a precomputed masked copy at session creation (the pruned pass as fast as the dense one, the target
weights resident twice); ``fold_masks=False`` keeps one copy and masks per call (slower; folding off alone
saved nothing when measured on SD1.5, hence prepacking off too). The file on disk is the same either way.

Policy graphs (:mod:`.onnx_policy`, input ``poa_pass``) fold the same way: ONNX Runtime folds the masks inside
the pruned pass's ``If`` branch too (outer-scope initializers count as constants), once, as the pass is in the
graph once; ``fold_masks=False`` leaves them per call there as well. ONNX Runtime's NCHWc convolution layout is
not applied inside ``If`` branches; the both-passes step still measured as fast as the dual graph on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from crdiff_cli.errors import CrdiffError, ParameterError, first_line
from crdiff_cli.exporters.metadata import ArtifactError, ArtifactMetadata


def open_session(path: Path, *, provider: str | None = None, fold_masks: bool = True, threads: int | None = None,
                 warn: Callable[[str], None] | None = None):
    """An ``InferenceSession`` on ``path``; load failures become one :class:`ArtifactError` line.

    The weights are checked against the digest recorded at bake time first
    (:func:`~crdiff_cli.exporters.onnx_artifact.check_weights`): a modified or corrupted artifact is refused
    before ONNX Runtime reads it. An artifact baked without a digest opens, and ``warn`` hears one line saying
    its weights are unverified (default: a Python ``UserWarning``; the CLI passes its own ``warning:`` line).
    """
    import onnxruntime as ort

    from crdiff_cli.deploy.sessions import providers_for, session_options, with_settings
    from crdiff_cli.exporters import onnx_artifact

    providers = providers_for(provider)
    unverified = onnx_artifact.check_weights(path)
    if unverified:
        (warn or _warn)(unverified)
    try:
        return ort.InferenceSession(str(path), session_options(fold_masks, threads),
                                    providers=with_settings(providers, path))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({first_line(exc)}); the file or its external data "
                            "may be truncated or corrupt") from None


def run_session(session, inputs: dict, poa_pass: int | None = None, bind: bool = False):
    """Run the graph on torch tensors (cast to the graph's input types); returns ``out_sample``, a torch tensor.

    ``poa_pass`` (policy graphs only, see :mod:`.onnx_policy`): 0 both passes, 1 the dense one, 2 the pruned
    one; returns ``(out_sample, poa_delta)``. Without it a policy graph runs both passes, as the dual graph does.
    ``bind`` runs through ONNX Runtime's IO binding: the session reads the input tensors and writes the outputs
    in place, on the tensors' own device (no copy through host numpy; what GPU providers need). On the CPU
    both paths give identical outputs.
    """
    import numpy as np

    from crdiff_cli.exporters.onnx_graph import DELTA, OUTPUT, PASS, PASS_BOTH, PASS_DENSE, PASS_PRUNED

    types = {i.name: i.type for i in session.get_inputs()}
    if poa_pass is not None and PASS not in types:
        raise CrdiffError(f"this ONNX artifact's graph has no {PASS} input: it always runs both passes; bake it "
                          "with the POA switch to run one pass per step")
    if poa_pass not in (None, PASS_BOTH, PASS_DENSE, PASS_PRUNED):
        raise ParameterError("poa_pass", poa_pass, "must be 0 (both passes), 1 (dense) or 2 (pruned)")
    names = [OUTPUT] if poa_pass is None else [OUTPUT, DELTA]
    tensors = {name: inputs[name].detach().to(_TORCH[types[name]]).contiguous() for name in types if name != PASS}
    if PASS in types:
        tensors[PASS] = torch.tensor([PASS_BOTH if poa_pass is None else poa_pass], dtype=torch.int64)
    if bind:
        outputs = _run_bound(session, tensors, names)
    else:
        feeds = {name: t.cpu().numpy() for name, t in tensors.items()}
        outputs = [torch.from_numpy(np.ascontiguousarray(out)) for out in session.run(names, feeds)]
    return outputs[0] if poa_pass is None else tuple(outputs)


def _run_bound(session, tensors: dict, names: list[str]) -> list:
    """One run with every input and output bound to torch memory (the outputs: the sample's batch and size, the
    graph's channels)."""
    binding = session.io_binding()
    for name, tensor in tensors.items():
        binding.bind_input(name, tensor.device.type, tensor.device.index or 0, _numpy_dtype(tensor),
                           tuple(tensor.shape), tensor.data_ptr())
    sample = tensors["sample"]
    channels = {o.name: o.shape[1] for o in session.get_outputs()}
    outputs = [sample.new_empty((sample.shape[0], channels[name], *sample.shape[2:])) for name in names]
    for name, out in zip(names, outputs):
        binding.bind_output(name, out.device.type, out.device.index or 0, _numpy_dtype(out), tuple(out.shape),
                            out.data_ptr())
    if sample.is_cuda:  # ONNX Runtime runs on its own stream: the inputs torch wrote must be complete first
        torch.cuda.synchronize(sample.device)
    session.run_with_iobinding(binding)
    return outputs


def _numpy_dtype(tensor):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[tensor.dtype]


def has_poa_pass(session) -> bool:
    """Whether ``session`` runs a policy graph (:mod:`.onnx_policy`): one with the ``poa_pass`` input."""
    from crdiff_cli.exporters.onnx_graph import PASS

    return any(i.name == PASS for i in session.get_inputs())


_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
          "tensor(int64)": torch.int64}


class OnnxUNet(nn.Module):
    """A ``pipe.unet`` stand-in backed by an ONNX Runtime session of a crdiff artifact.

    Pipelines read ``config``, ``dtype``, ``device`` and (SDXL) ``add_embedding.linear_1.in_features``
    from their UNet and call it with diffusers' UNet signature. On GPU providers the session reads and writes
    the pipeline's tensors in place (IO binding, ``bind``); on the CPU they cross as numpy. Outputs come back
    in ``dtype`` on the device the inputs came from. It holds no parameters: the weights live in the session.
    """

    def __init__(self, session, meta: ArtifactMetadata, dtype=None, poa=None, bind: bool | None = None):
        from diffusers.configuration_utils import FrozenDict

        from crdiff_cli.dual.poa_steps import PoaSteps

        super().__init__()
        self.session = session
        self.meta = meta
        self.config = FrozenDict(meta.unet_config)
        self._dtype = dtype or torch.float32
        self.poa = PoaSteps(poa)  # bind it to the pipeline (``unet.poa.bind(pipe)``) for a partial policy
        self._switch = has_poa_pass(session)
        # IO binding (tensors read and written in place) by default on GPU providers: no host round trip per step
        self.bind = session.get_providers()[0] != "CPUExecutionProvider" if bind is None else bind
        if not (self.poa.policy.is_full or self._switch):
            raise CrdiffError("this ONNX graph always runs both passes; a partial POA policy needs an artifact baked "
                              "with one (the one-pass switch, input poa_pass)")
        if self.config.get("addition_embed_type") == "text_time":
            from types import SimpleNamespace

            in_features = self.config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features))

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict: bool = True, **unsupported):
        extra = [k for k, v in {"timestep_cond": timestep_cond, "cross_attention_kwargs": cross_attention_kwargs,
                                **unsupported}.items() if v is not None]
        if extra:
            raise CrdiffError(f"the ONNX artifact's graph has no input for {', '.join(extra)}; use the "
                              "safetensors artifact (live PyTorch path) for adapters and ControlNets")
        inputs = {"sample": sample, "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1),
                  "encoder_hidden_states": encoder_hidden_states, **(added_cond_kwargs or {})}
        out = self._run(inputs, timestep).to(device=sample.device, dtype=self._dtype)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _run(self, inputs: dict, timestep) -> torch.Tensor:
        """One call as the POA policy plans it: the graph's both-passes output, or one pass (plus the cached
        difference); a graph without the switch always runs both passes."""
        from crdiff_cli.exporters.onnx_graph import PASS_BOTH, PASS_DENSE, PASS_PRUNED

        if not self._switch:
            return run_session(self.session, inputs, bind=self.bind)
        k = self.meta.k
        kind, step = self.poa.plan(timestep, k)
        one_pass = {"dense": PASS_DENSE, "cached-dense": PASS_DENSE, "pruned": PASS_PRUNED,
                    "cached-pruned": PASS_PRUNED}.get(kind)
        if one_pass is not None:
            out = run_session(self.session, inputs, one_pass, bind=self.bind)[0]
            return self.poa.from_cache(out, k, kind) if kind.startswith("cached-") else out
        out, delta = run_session(self.session, inputs, PASS_BOTH, bind=self.bind)
        if self.poa.policy.refresh > 1 or self.poa.trace is not None:
            self.poa.keep(delta, out - k * delta if self.poa.trace is not None else None, out, step, timestep)
        return out


def _warn(message: str) -> None:
    """``open_session``'s default ``warn`` for library callers: a Python warning."""
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)
