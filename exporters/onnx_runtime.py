"""Running an ONNX artifact with ONNX Runtime: provider choice, the mask-folding trade-off, and a
``unet`` adapter so diffusers' Stable Diffusion pipelines can call the graph.

Mask folding: at session creation ONNX Runtime constant-folds every node whose inputs are
all initializers, so each in-graph ``Where(|W| > t, W, 0)`` becomes a precomputed masked copy: the
pruned pass then runs as fast as the dense one, at the price of a second resident copy of the target
weights. ``fold_masks=False`` disables the ``ConstantFolding`` optimizer (session config
``optimization.disable_specified_optimizers``) and weight prepacking (``session.disable_prepacking``:
a prepacked MatMul keeps its own packed copy, and the original must stay for the masks, so folding
off alone saved nothing when measured on SD1.5): one copy of the weights, a mask per target per call,
slower. The file on disk is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from crdiff_cli.errors import CrdiffError, first_line
from crdiff_cli.exporters.metadata import ArtifactError, ArtifactMetadata

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def choose_providers(provider: str | None) -> list[str]:
    """ONNX Runtime providers in order of preference: ``provider`` if forced, else TensorRT, CUDA, CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is None:
        return [p for p in PROVIDERS.values() if p in available]
    if provider not in PROVIDERS:
        raise CrdiffError(f"unknown --provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in available:
        raise CrdiffError(f"ONNX Runtime provider {PROVIDERS[provider]} is not available here (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu for cuda/tensorrt")
    return [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])


def session_options(fold_masks: bool = True, threads: int | None = None):
    """SessionOptions: quiet logging; ``fold_masks=False`` keeps the masks computed per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: folding warnings would be printed per node
    if not fold_masks:
        options.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def open_session(path: Path, *, provider: str | None = None, fold_masks: bool = True, threads: int | None = None,
                 warn: Callable[[str], None] | None = None):
    """An ``InferenceSession`` on ``path``; load failures become one :class:`ArtifactError` line.

    The weights are checked against the digest recorded at bake time first
    (:func:`~crdiff_cli.exporters.onnx_artifact.check_weights`): a modified or corrupted artifact is refused
    before ONNX Runtime reads it. An artifact baked without a digest opens, and ``warn`` hears one line saying
    its weights are unverified (default: a Python ``UserWarning``; the CLI passes its own ``warning:`` line).
    """
    import onnxruntime as ort

    from crdiff_cli.exporters import onnx_artifact

    providers = choose_providers(provider)
    unverified = onnx_artifact.check_weights(path)
    if unverified:
        (warn or _warn)(unverified)
    try:
        return ort.InferenceSession(str(path), session_options(fold_masks, threads), providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({first_line(exc)}); the file or its "
                            f"{Path(path).name}.data may be truncated or corrupt") from None


def run_session(session, inputs: dict):
    """Run the dual graph on torch tensors (cast to the graph's input types); returns a torch tensor."""
    import numpy as np

    types = {i.name: i.type for i in session.get_inputs()}
    feeds = {name: inputs[name].detach().cpu().numpy().astype(_NUMPY[types[name]], copy=False) for name in types}
    return torch.from_numpy(np.ascontiguousarray(session.run(["out_sample"], feeds)[0]))


_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
          "tensor(int64)": "int64"}


class OnnxUNet(nn.Module):
    """A ``pipe.unet`` stand-in backed by an ONNX Runtime session of a crdiff artifact.

    Pipelines read ``config``, ``dtype``, ``device`` and (SDXL) ``add_embedding.linear_1.in_features``
    from their UNet and call it with diffusers' UNet signature; tensors cross to the session as numpy
    on the CPU and come back in ``dtype`` on the device they came from (the rest of the pipeline may
    run on a GPU). It holds no parameters: the weights live in the session.
    """

    def __init__(self, session, meta: ArtifactMetadata, dtype=None):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.session = session
        self.meta = meta
        self.config = FrozenDict(meta.unet_config)
        self._dtype = dtype or torch.float32
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
        out = run_session(self.session, inputs).to(device=sample.device, dtype=self._dtype)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


def _warn(message: str) -> None:
    """``open_session``'s default ``warn`` for library callers: a Python warning."""
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)
