"""Which UNet weights CR-Diff prunes, and in which group.

The rule (from the paper's reference code): an ``nn.Linear`` or ``nn.Conv2d`` whose
qualified name starts with ``down_blocks``, ``mid_block`` or ``up_blocks``, contains ``attn`` or ``ff``
and does not contain ``attn2``. In a diffusers UNet that is every transformer block's self-attention
projections and feed-forward linears; cross-attention, resnets and embeddings are never pruned. Only
``.weight`` is a target, never a bias.

Adapters (docs/method.md, "LoRA"): ``pipe.load_lora_weights`` wraps a target ``nn.Linear`` in a PEFT
layer whose own children (``base_layer``, ``lora_A.<name>``, ``lora_B.<name>``, DoRA's
``lora_magnitude_vector``, ...) match the rule by name. Adapter matrices are never targets. The pruned
branch is defined as the pruned *LoRA-fused* weights (``W + scale * B A``): a PEFT layer whose adapters
are all fused (``pipe.fuse_lora()``) contributes its ``base_layer`` (which holds exactly those weights);
one with an active unfused adapter is refused with a message telling the user to fuse it, because its
output is not a function of any single weight that could be pruned.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.ratios import GROUPS

TargetFilter = Callable[[str, nn.Module], "str | None"]
"""Chooses target layers: ``(qualified module name, module) -> group ("down"/"mid"/"up") or None``."""

_PREFIX_GROUP = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
FUSE_HINT = "fuse it first: pipe.fuse_lora() (crdiff --lora PATH[:SCALE] does that for you)"


def group_of(module_name: str) -> str | None:
    """The group (``down``/``mid``/``up``) of a module name, or None if it is not a target by name."""
    group = _PREFIX_GROUP.get(module_name.split(".", 1)[0])
    if group is None or "attn2" in module_name:
        return None
    if "attn" in module_name or "ff" in module_name:
        return group
    return None


def default_target(name: str, module: nn.Module) -> str | None:
    """crdiff's rule as a target filter: a ``Linear`` or ``Conv2d`` whose name :func:`group_of` accepts."""
    return group_of(name) if isinstance(module, (nn.Linear, nn.Conv2d)) else None


def is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, LoHa, DoRA, ...) wrapping a base layer; duck-typed so peft stays optional."""
    return hasattr(module, "get_base_layer") and hasattr(module, "merged_adapters")


def unfused_adapters(layer: nn.Module) -> list[str]:
    """The adapters of a PEFT layer that change its output without being fused into its base weights."""
    if getattr(layer, "disable_adapters", False):
        return []
    own = set(getattr(layer, "lora_A", {}) or {}) | set(getattr(layer, "lora_embedding_A", {}) or {})
    active = getattr(layer, "active_adapters", [])
    active = [active] if isinstance(active, str) else list(active)
    return [a for a in active if (a in own or not own) and a not in layer.merged_adapters]


def target_modules(unet: nn.Module, target_filter: TargetFilter | None = None) -> dict[str, list[tuple[str, nn.Module]]]:
    """Target layers of ``unet`` by group, in module order: ``{group: [(module_name, module), ...]}``.

    ``target_filter`` replaces crdiff's rule (:func:`default_target`) for UNets laid out differently; it
    sees every module except the insides of PEFT layers. A :class:`~crdiff_cli.dual.unet.DualUNet` is
    unwrapped: its targets are those of the UNet it holds. Inside a PEFT layer only the base layer can be
    a target (under its real name, ``....base_layer``); an unfused adapter on a target raises
    :class:`CrdiffError`.
    """
    choose = target_filter or default_target
    unet = unet._modules.get("unet", unet)
    groups: dict[str, list[tuple[str, nn.Module]]] = {g: [] for g in GROUPS}
    adapter_parts: set[int] = set()  # ids of modules inside PEFT layers that are not their base layer
    for name, module in unet.named_modules():
        if id(module) in adapter_parts:
            continue
        if is_adapter_layer(module):
            base = module.get_base_layer()
            adapter_parts.update(id(m) for m in module.modules() if m is not module and m is not base)
            if choose(name, base) is not None and unfused_adapters(module):
                raise CrdiffError(f"{name} carries an unfused adapter ({', '.join(unfused_adapters(module))}); "
                                  f"crdiff prunes LoRA-fused weights: {FUSE_HINT}")
            continue
        group = choose(name, module)
        if group is not None:
            if group not in groups:
                raise CrdiffError(f"the target filter put {name} in group {group!r}; groups are {', '.join(GROUPS)}")
            if not isinstance(getattr(module, "weight", None), nn.Parameter):
                raise CrdiffError(f"the target filter chose {name}, which has no weight parameter")
            groups[group].append((name, module))
    return groups


def target_weights(unet: nn.Module, target_filter: TargetFilter | None = None) -> dict[str, list[tuple[str, "nn.Parameter"]]]:
    """Target weight parameters by group: ``{group: [("<module>.weight", parameter), ...]}``."""
    return {g: [(f"{name}.weight", m.weight) for name, m in mods]
            for g, mods in target_modules(unet, target_filter).items()}


def require_plain(unet: nn.Module) -> None:
    """Refuse a UNet that still holds PEFT adapter layers (fused or not): artifacts store plain weights."""
    unet = unet._modules.get("unet", unet)
    layer = next((name for name, m in unet.named_modules() if is_adapter_layer(m)), None)
    if layer is not None:
        raise CrdiffError(f"the UNet holds PEFT adapter layers (e.g. {layer}); an artifact stores plain weights: "
                          "fuse the LoRA and remove the adapter layers first: pipe.fuse_lora(); "
                          "pipe.unload_lora_weights()")
