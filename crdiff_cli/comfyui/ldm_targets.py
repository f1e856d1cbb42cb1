"""crdiff's target rule on ComfyUI's module names (the original LDM layout of Stable Diffusion's UNet).

ComfyUI runs the UNet under the names of the original Stable Diffusion code, not diffusers': its blocks are
``input_blocks`` (``input_blocks.0`` is the input convolution, the rest are diffusers' ``down_blocks``),
``middle_block`` (``mid_block``) and ``output_blocks`` (``up_blocks``); ``time_embed``, ``label_emb`` and
``out`` lie outside every block. Inside a block the transformer layers are named alike in both layouts
(``transformer_blocks.0.attn1.to_q``, ``...ff.net.2``), so the group is found from the block and the rest
of the name goes through crdiff's own rule (:func:`~crdiff_cli.pruning.targets.group_of`), unchanged.
"""

from __future__ import annotations

from torch import nn

from crdiff_cli.pruning.targets import group_of

PREFIX = "diffusion_model."  # ComfyUI's name of the UNet inside its model (weight keys start with it)
_BLOCKS = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}


def ldm_group(module_name: str) -> str | None:
    """The group (``down``/``mid``/``up``) of a module of ComfyUI's UNet, or None if it is not a target by name."""
    head, _, rest = module_name.removeprefix(PREFIX).partition(".")
    block = _BLOCKS.get(head)
    if block is None or (head == "input_blocks" and rest.split(".", 1)[0] == "0"):
        return None
    return group_of(f"{block}.{rest}")


def ldm_target(name: str, module: nn.Module) -> str | None:
    """crdiff's rule as a target filter for ComfyUI's UNet: a ``Linear`` or ``Conv2d`` whose name is a target."""
    return ldm_group(name) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
