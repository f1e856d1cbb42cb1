"""Model families: which Stable Diffusion a UNet is, told from its config (profiles are made per family)."""

from __future__ import annotations

FAMILIES = ("sd15", "sd21", "sdxl", "unknown")


def detect_family(unet_config) -> str:
    """``sdxl`` (text_time added conditioning), ``sd21`` (1024-d cross-attention), ``sd15`` (768-d)."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    if get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = get("cross_attention_dim")
    if cross == 1024:
        return "sd21"
    if cross == 768:
        return "sd15"
    return "unknown"
