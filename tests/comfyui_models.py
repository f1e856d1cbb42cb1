"""Seeded random models in ComfyUI's own formats, for the ComfyUI tier (tests/test_comfyui.py).

Built from ComfyUI's classes at run time (ComfyUI is never copied here). ComfyUI recognises SD1.5 by the
UNet's width and cross-attention size, not its depth, so a UNet with SD1.5's 320 channels and 768-d context
but two levels of one block each (44M parameters) loads as SD15. Its text encoder has SD1.5's fixed size; the
VAE is TAESD (2.4M parameters), which ComfyUI accepts in a checkpoint in place of the full VAE. Every tensor is
seeded by its own name, so the weights do not depend on what else the file holds.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
            channel_mult=[1, 1], dropout=0.0, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
            transformer_depth_middle=1, context_dim=768, num_heads=8, use_spatial_transformer=True, legacy=False,
            use_checkpoint=False, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None)


def seeded(key: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """Norm scales 1, biases 0, every other float tensor N(0, 0.02^2), from a generator seeded by ``key``."""
    if not like.is_floating_point():
        return like.clone()
    leaf = key.rsplit(".", 1)[-1]
    if like.ndim == 1 and leaf == "weight" and any(n in key for n in ("norm", "ln_", "in_layers.0", "out_layers.0",
                                                                       ".out.0.")):
        return torch.ones(like.shape)
    if like.ndim <= 1 and leaf == "bias":
        return torch.zeros(like.shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(like.shape, generator=generator) * 0.02


def unet_module(config: dict | None = None):
    """ComfyUI's UNetModel in the tiny SD15-detected shape, or ``UNET`` updated by ``config`` (uninitialised)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**{**UNET, **(config or {})}, device="cpu", operations=comfy.ops.disable_weight_init)


def build_checkpoint(path: Path, seed: int = 0, unet_config: dict | None = None) -> Path:
    """A seeded SD15-detected checkpoint (UNet, SD1.5 CLIP-L text encoder, TAESD VAE) at ``path``, fp16;
    ``unet_config`` changes the UNet's shape (e.g. SD1.5's own depth)."""
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import safetensors.torch

    tensors = {"model.diffusion_model." + k: v for k, v in unet_module(unet_config).state_dict().items()}
    tensors.update({"first_stage_model." + k: v for k, v in comfy.taesd.taesd.TAESD(latent_channels=4).state_dict().items()})
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32).state_dict()
    tensors.update({"cond_stage_model." + k.removeprefix("clip_l."): v for k, v in clip.items()
                    if k.startswith("clip_l.") and not k.endswith("logit_scale")})
    out = {}
    for key in sorted(tensors):
        value = torch.arange(77).unsqueeze(0) if key.endswith("position_ids") else seeded(key, tensors[key], seed)
        out[key] = value.to(torch.float16).contiguous() if value.is_floating_point() else value
    out["first_stage_model.vae_scale"] = torch.tensor(1.0, dtype=torch.float16)
    out["first_stage_model.vae_shift"] = torch.tensor(0.0, dtype=torch.float16)
    safetensors.torch.save_file(out, str(path))
    return path


def build_controlnet(path: Path, unet_state: dict[str, torch.Tensor], seed: int = 1) -> Path:
    """A ControlNet for the tiny UNet in ComfyUI's (LDM) format, made from the UNet as ControlNets are: its
    encoder copied from the UNet's weights, the hint encoder and the zero convolutions seeded (non-zero, so the
    residuals reach the UNet)."""
    import comfy.ops
    import safetensors.torch
    from comfy.cldm.cldm import ControlNet

    config = {k: v for k, v in UNET.items() if k not in ("out_channels", "transformer_depth_output", "legacy")}
    net = ControlNet(hint_channels=3, **config, operations=comfy.ops.disable_weight_init, device="cpu")
    state = {}
    for key, like in net.state_dict().items():
        state[key] = unet_state[key].float() if key in unet_state and unet_state[key].shape == like.shape \
            else seeded(key, like, seed)
    safetensors.torch.save_file({"control_model." + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def build_lora(path: Path, targets: list[tuple[str, tuple[int, int]]], rank: int = 4, seed: int = 2) -> Path:
    """A LoRA on UNet weights given as ``(key, (out_features, in_features))``, keys as ComfyUI names them
    (``diffusion_model.<...>.weight``), in the generic format ComfyUI reads (``<key without .weight>.lora_up
    .weight`` / ``.lora_down.weight``), seeded, strong enough to move magnitudes."""
    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_features, in_features) in targets:
        base = key.removesuffix(".weight")
        tensors[f"{base}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.2
        tensors[f"{base}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.2
    safetensors.torch.save_file(tensors, str(path))
    return path
