"""The dual UNet: a dense UNet and its pruned twin, combined by pruned output amplification (POA).

For the same inputs, with ``e_d`` the dense output and ``e_p`` the pruned output, the dual UNet returns
``e = e_d + k * (e_p - e_d)`` (``k = 0`` dense, ``k = 1`` pruned, ``k > 1`` amplified). It is a
drop-in ``unet`` for diffusers' Stable Diffusion pipelines, so every UNet call, both halves of a
classifier-free-guidance batch included, goes through it.

Memory: the twin is not a copy. Each target weight of the one UNet gets a PyTorch parametrization that
returns the dense weight during the dense pass and the pruned weight during the pruned pass; every
other parameter is simply the same tensor. The pruned weight is either a masked copy kept resident
(``masks="copy"``: +targets' size, all copies in one allocation, see :func:`masked_copy_slots`; saves
the masking, which matters where a UNet pass is short: small latents, GPUs) or computed per layer on
the fly from the dense weight (``masks="on-the-fly"``: no resident copy, one fused ``hardshrink`` per
layer per pass). Neither changes the dense pass: it runs on the dense weights as a plain UNet does.

Exactness: the combination uses ``torch.lerp``, which returns ``e_d`` exactly at ``k = 0``, ``e_p``
exactly at ``k = 1`` and ``e_d`` exactly when both branches agree; ``k = 0`` and ``k = 1`` also skip the
branch whose weight is zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from crdiff_cli.errors import CrdiffError
from crdiff_cli.prune_spec import PruneSpec, check_matches, pruned_weight

MASK_MODES = ("copy", "on-the-fly")


class Branch:
    """Which branch the shared target weights currently serve (read by every parametrization)."""

    pruned = False


class _PrunedWeight(nn.Module):
    """Parametrization of one target weight: the dense weight, or its pruned version in the pruned pass.

    ``masked`` is this weight's slot in the dual UNet's one buffer of masked copies (copy mode), or None
    (on-the-fly mode: the pruned weight is computed from the dense one at each use).
    """

    def __init__(self, branch: Branch, masked: torch.Tensor | None):
        super().__init__()
        self.branch = branch
        self.threshold: float | None = None
        self.register_buffer("masked", masked, persistent=False)

    def set_threshold(self, original: torch.Tensor, threshold: float | None) -> None:
        """Re-mask in place (a search re-masks every step, and writing into fresh memory costs ~20x more
        than the masking itself: page faults)."""
        self.threshold = threshold
        if self.masked is not None and threshold is not None:
            torch.hardshrink(original, threshold, out=self.masked)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.branch.pruned or self.threshold is None:
            return weight
        if self.masked is not None:
            return self.masked
        return pruned_weight(weight, self.threshold)


class DualUNet(nn.Module):
    """A dense UNet plus its pruned twin (sharing all weights) returning ``e_d + k * (e_p - e_d)``.

    The UNet is modified in place (parametrizations on the target weights) but computes exactly as
    before outside the pruned pass; :meth:`release` removes the parametrizations and returns it.
    """

    def __init__(self, unet: nn.Module, spec: PruneSpec, k: float = 1.5, masks: str = "copy"):
        super().__init__()
        if masks not in MASK_MODES:
            raise CrdiffError(f"unknown mask mode {masks!r}; use one of {', '.join(MASK_MODES)}")
        self.unet = unet
        self.k = float(k)
        self.masks = masks
        self._branch = Branch()
        self._params: dict[str, tuple[str, nn.Module, _PrunedWeight]] = {}
        self._order: dict[nn.Module, list[str]] = {}  # each target module's parameter order, for release()
        targets = [(group, name, w) for group, weights in _checked_targets(unet, spec).items()  # refuse a wrong
                   for name, w in weights]                                                     # spec before any change
        slots = masked_copy_slots([w for _, _, w in targets]) if masks == "copy" else [None] * len(targets)
        for (group, name, _), slot in zip(targets, slots):
            module = unet.get_submodule(name.removesuffix(".weight"))
            param = _PrunedWeight(self._branch, slot)
            self._order[module] = list(module._parameters)
            parametrize.register_parametrization(module, "weight", param, unsafe=True)
            self._params[name] = (group, module, param)
        self.spec: PruneSpec | None = None
        self.set_spec(spec)

    def set_spec(self, spec: PruneSpec) -> None:
        """Switch to another ratio set's thresholds; only groups whose threshold changed are re-masked.

        The spec must come from this UNet as loaded (``PruneSpec.from_unet(dual, ...)`` or ``(dual.unet, ...)``):
        one computed on another shape or in another dtype has other thresholds, and is refused here
        rather than run inexactly.
        """
        _checked_targets(self.unet, spec)
        old = self.spec.thresholds() if self.spec is not None else {}
        new = spec.thresholds()
        with torch.no_grad():
            for group, module, param in self._params.values():
                if group not in old or old[group] != new[group]:
                    original = module.parametrizations.weight.original
                    param.set_threshold(original, new[group])
        self.spec = spec

    def forward(self, *args, **kwargs):
        if self.k == 0 or all(t is None for t in self.spec.thresholds().values()):
            return self.unet(*args, **kwargs)
        if self.k == 1:
            return self._pruned(*args, **kwargs)
        # Both passes get the same inputs. The UNet consumes list arguments in place (T2I-Adapter residuals
        # are popped from ``down_intrablock_additional_residuals``), so the pruned pass gets its own lists;
        # the tensors themselves (ControlNet residuals included) are shared, never recomputed.
        pruned_kwargs = {name: list(v) if isinstance(v, list) else v for name, v in kwargs.items()}
        dense = self.unet(*args, **kwargs)
        pruned = self._pruned(*args, **pruned_kwargs)
        if isinstance(dense, tuple):
            return (torch.lerp(dense[0], pruned[0], self.k), *dense[1:])
        dense.sample = torch.lerp(dense.sample, pruned.sample, self.k)
        return dense

    def _pruned(self, *args, **kwargs):
        self._branch.pruned = True
        try:
            return self.unet(*args, **kwargs)
        finally:
            self._branch.pruned = False

    def release(self) -> nn.Module:
        """Remove the parametrizations (dense weights stay in place), free the masked copies, return the plain UNet.

        PyTorch re-registers a released ``weight`` after ``bias``; the original order is restored so that
        the UNet's ``state_dict`` and parameter order are exactly as before.
        """
        for _, module, _ in self._params.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module._parameters = {name: module._parameters[name] for name in self._order[module]}
        self._params.clear()
        self._order.clear()
        return self.unet

    def __getattr__(self, name: str):
        # Pipelines read unet.config, unet.dtype, unet.add_embedding, ...: serve them from the dense UNet.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)


def _checked_targets(unet: nn.Module, spec: PruneSpec) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The UNet's target weights by group, after refusing a spec that was not computed on this UNet as loaded."""
    weights = check_matches(unet, spec)
    dtypes = {str(p.dtype).removeprefix("torch.") for ws in weights.values() for _, p in ws}
    if any(t is not None for t in spec.thresholds().values()) and dtypes != {spec.dtype}:
        raise CrdiffError(f"the prune spec's thresholds were taken on {spec.dtype} weights but this UNet's targets "
                          f"are {', '.join(sorted(dtypes))}; thresholds are exact only in the weights' own dtype: "
                          "recompute the spec on the model as loaded (PruneSpec.from_unet)")
    return weights


def masked_copy_slots(weights: list[torch.Tensor], align_bytes: int = 64) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like ``weights``: views of ONE allocation per dtype and device.

    One block of the targets' total size (0.79 GB for SD1.5) instead of 96 allocations of 0.4-50 MB:
    the masked copies are not scattered among the activations in the C allocator's heap (left at its
    defaults, glibc maps a block this large on its own; a caching allocator holds it as one segment),
    so they do not change where the dense pass's temporaries go, and :meth:`DualUNet.release` frees
    them as one block. Each slot starts at a multiple of ``align_bytes``, as aligned as a fresh tensor.
    """
    slots: list[torch.Tensor | None] = [None] * len(weights)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, w in enumerate(weights):
        kinds.setdefault((w.dtype, w.device), []).append(i)
    for (dtype, device), indices in kinds.items():
        align = max(1, align_bytes // torch.empty((), dtype=dtype).element_size())
        sizes = [-(-weights[i].numel() // align) * align for i in indices]
        buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
        for i, chunk in zip(indices, buffer.split(sizes)):
            slots[i] = chunk[: weights[i].numel()].view(weights[i].shape)
    return slots


def resident_bytes(module: nn.Module) -> int:
    """Bytes of all distinct tensors a module keeps (parameters and buffers, shared ones counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
