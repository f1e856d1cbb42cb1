"""The pipeline's other models as ONNX graphs: text encoders and the VAE's encoder and decoder.

Names follow ONNX Runtime / Optimum's Stable Diffusion exports, so their pipelines read them as they are:

- text encoders take int32 ``input_ids`` ``[batch, sequence]`` (what diffusers' ONNX pipeline feeds) and
  return ``last_hidden_state`` and ``pooler_output`` (``text_embeds`` first for the projection encoder of
  SDXL); SDXL's encoders also return every ``hidden_states.{i}``, since SDXL conditions on the penultimate;
- ``vae_decoder``: ``latent_sample`` -> ``sample``; ``vae_encoder``: ``sample`` -> ``latent_sample``, the mean
  of the latent distribution (deterministic: img2img callers add their own noise).

Each is traced with the TorchScript exporter like the UNet (opset, no constant folding), batch and spatial
sizes dynamic.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class TextEncoderGraph(nn.Module):
    """A CLIP text encoder with int32 ids in and named outputs, as :func:`text_encoder_outputs` lists them."""

    def __init__(self, encoder: nn.Module, hidden_states: bool):
        super().__init__()
        self.encoder = encoder
        self.hidden_states = hidden_states
        self.projection = hasattr(encoder, "text_projection")

    def forward(self, input_ids):
        out = self.encoder(input_ids.long(), output_hidden_states=self.hidden_states, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if self.projection else (out.last_hidden_state,
                                                                                   out.pooler_output)
        return (*first, *(out.hidden_states if self.hidden_states else ()))


def text_encoder_outputs(encoder: nn.Module, hidden_states: bool) -> list[str]:
    first = ["text_embeds", "last_hidden_state"] if hasattr(encoder, "text_projection") else ["last_hidden_state",
                                                                                             "pooler_output"]
    layers = encoder.config.num_hidden_layers
    return first + ([f"hidden_states.{i}" for i in range(layers + 1)] if hidden_states else [])


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].mean


def export_text_encoder(encoder: nn.Module, path: Path, *, hidden_states: bool, opset: int,
                        max_length: int = 77) -> None:
    """Trace a CLIP text encoder with eager attention: the exporter's SDPA in fp16 yields an fp32 output that
    then meets fp16 weights, a graph no runtime loads."""
    ids = torch.zeros(1, max_length, dtype=torch.int32)
    outputs = text_encoder_outputs(encoder, hidden_states)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, **{name: {0: "batch"} for name in outputs}}
    attention = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")
    try:
        _export(TextEncoderGraph(encoder, hidden_states), (ids,), ["input_ids"], outputs, axes, path, opset)
    finally:
        encoder.set_attn_implementation(attention)


def export_vae(vae: nn.Module, folder: Path, *, opset: int) -> None:
    """``folder/vae_decoder/model.onnx`` and ``folder/vae_encoder/model.onnx``."""
    from crdiff_cli.deploy.folder import vae_scale

    config = vae.config
    factor = vae_scale(config)
    dtype = next(vae.parameters()).dtype
    latent = torch.zeros(1, config.latent_channels, 3, 2, dtype=dtype)
    image = torch.zeros(1, config.in_channels, 3 * factor, 2 * factor, dtype=dtype)
    spatial = {0: "batch", 2: "height", 3: "width"}
    _export(VaeDecoderGraph(vae), (latent,), ["latent_sample"], ["sample"],
            {"latent_sample": spatial, "sample": spatial}, folder / "vae_decoder" / "model.onnx", opset)
    _export(VaeEncoderGraph(vae), (image,), ["sample"], ["latent_sample"],
            {"sample": spatial, "latent_sample": spatial}, folder / "vae_encoder" / "model.onnx", opset)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], axes: dict, path: Path,
            opset: int) -> None:
    """Trace ``module`` into ``path``; weights over protobuf's 2 GiB (SDXL's second text encoder in fp32) go to
    one ``model.onnx_data`` beside it, not the exporter's file per tensor."""
    import shutil
    import tempfile

    import onnx

    from crdiff_cli.exporters.onnx_artifact import _write_external, data_path

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".trace-", dir=path.parent))
    try:
        raw = scratch / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
            torch.onnx.export(module.eval(), args, str(raw), dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=False)
        model = onnx.load(str(raw), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            _write_external(model.graph.initializer, scratch, data_path(path))
            onnx.save_model(model, str(path))
        else:
            raw.replace(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
