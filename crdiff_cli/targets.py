"""Which UNet weights CR-Diff prunes, and in which group.

The rule (DESIGN.md §1, from the paper's reference code): an ``nn.Linear`` or ``nn.Conv2d`` whose
qualified name starts with ``down_blocks``, ``mid_block`` or ``up_blocks``, contains ``attn`` or ``ff``
and does not contain ``attn2``. In a diffusers UNet that is every transformer block's self-attention
projections and feed-forward linears; cross-attention, resnets and embeddings are never pruned. Only
``.weight`` is a target, never a bias.
"""

from __future__ import annotations

from torch import nn

from crdiff_cli.ratios import GROUPS

_PREFIX_GROUP = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def group_of(module_name: str) -> str | None:
    """The group (``down``/``mid``/``up``) of a module name, or None if it is not a target by name."""
    group = _PREFIX_GROUP.get(module_name.split(".", 1)[0])
    if group is None or "attn2" in module_name:
        return None
    if "attn" in module_name or "ff" in module_name:
        return group
    return None


def target_modules(unet: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Target layers of ``unet`` by group, in module order: ``{group: [(module_name, module), ...]}``.

    A :class:`~crdiff_cli.dual_unet.DualUNet` is unwrapped: its targets are those of the UNet it holds.
    """
    unet = unet._modules.get("unet", unet)
    groups: dict[str, list[tuple[str, nn.Module]]] = {g: [] for g in GROUPS}
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            group = group_of(name)
            if group is not None:
                groups[group].append((name, module))
    return groups


def target_weights(unet: nn.Module) -> dict[str, list[tuple[str, "nn.Parameter"]]]:
    """Target weight parameters by group: ``{group: [("<module>.weight", parameter), ...]}``."""
    return {g: [(f"{name}.weight", m.weight) for name, m in mods] for g, mods in target_modules(unet).items()}
