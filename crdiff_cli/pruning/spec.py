"""PruneSpec: ratios -> exact per-group thresholds, and the one call that applies them.

A pruned UNet is fully determined by the dense weights, the target rule (:mod:`crdiff_cli.pruning.targets`)
and three thresholds: in a group with ``n`` target weights and ratio ``r``, ``m = floor(n * r)``; if
``m == 0`` the group is untouched, otherwise ``t`` is the m-th smallest ``|w|`` (in the weights' own
dtype) and every weight with ``|w| <= t`` becomes zero (ties at ``t`` included). So the spec, not a
second copy of the model, is what the live path, the search and the artifacts carry around.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.ratios import GROUPS, Ratios
from crdiff_cli.pruning.selection import MagnitudeHistogram
from crdiff_cli.pruning.targets import TargetFilter, target_weights


@dataclass(frozen=True)
class GroupSpec:
    """One group's share of a spec: its ratio, threshold (None = untouched) and counts."""

    ratio: float
    layers: int
    targets: int
    threshold: float | None
    pruned: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.targets if self.targets else 0.0


@dataclass(frozen=True)
class PruneSpec:
    """Ratios plus the exact thresholds and counts they give on one model's dense weights.

    ``target_filter`` is the rule that chose the target layers (None: crdiff's own,
    :func:`~crdiff_cli.pruning.targets.default_target`); it travels with the spec so that whatever applies
    the spec finds the same targets. It is not serialized: artifacts and profiles use crdiff's rule.
    """

    ratios: Ratios
    groups: dict[str, GroupSpec]
    dtype: str
    target_filter: TargetFilter | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_unet(cls, unet: nn.Module, ratios: Ratios, *, target_filter: TargetFilter | None = None) -> "PruneSpec":
        """The exact thresholds of ``ratios`` on ``unet``'s dense target weights (chosen by ``target_filter``)."""
        return PruneStats(unet, target_filter).spec(ratios)

    def thresholds(self) -> dict[str, float | None]:
        return {g: s.threshold for g, s in self.groups.items()}

    def to_dict(self) -> dict:
        return {"ratios": self.ratios.as_dict(), "dtype": self.dtype,
                "groups": {g: asdict(s) for g, s in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PruneSpec":
        return cls(Ratios.from_dict(data["ratios"]), {g: GroupSpec(**data["groups"][g]) for g in GROUPS},
                   str(data["dtype"]))


class PruneStats:
    """Per-group magnitude statistics of a UNet's dense target weights, computed once.

    Building it costs one streaming pass over the targets; after that, :meth:`spec` for any ratio set
    costs at most one cheaper pass per group, which is what makes a search over ratios affordable.
    """

    def __init__(self, unet: nn.Module, target_filter: TargetFilter | None = None):
        self.target_filter = target_filter
        self.weights = target_weights(unet, target_filter)
        with torch.no_grad():
            self.histograms = {g: MagnitudeHistogram([p for _, p in ws]) for g, ws in self.weights.items() if ws}
        dtypes = {str(h.dtype).removeprefix("torch.") for h in self.histograms.values()}
        if len(dtypes) > 1:
            raise CrdiffError(f"target weights have mixed dtypes {sorted(dtypes)}; load the model in one dtype")
        self.dtype = dtypes.pop() if dtypes else "float32"
        self._cache: dict[tuple[str, int], tuple[float, int]] = {}

    def spec(self, ratios: Ratios) -> PruneSpec:
        return PruneSpec(ratios, {g: self.group_spec(g, ratios[g]) for g in GROUPS}, self.dtype, self.target_filter)

    def group_spec(self, group: str, ratio: float) -> GroupSpec:
        weights = self.weights[group]
        n = sum(p.numel() for _, p in weights)
        m = math.floor(n * ratio)
        if m == 0:
            return GroupSpec(ratio, len(weights), n, None, 0)
        if (group, m) not in self._cache:
            with torch.no_grad():
                self._cache[(group, m)] = self.histograms[group].kth_smallest(m)
        threshold, pruned = self._cache[(group, m)]
        return GroupSpec(ratio, len(weights), n, threshold, pruned)


def pruned_weight(weight: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """A new tensor: ``weight`` with every ``|w| <= threshold`` set to zero (a copy when untouched).

    ``hardshrink`` is exactly that rule (``|w| == t`` is zeroed, NaN is kept, like :func:`prune_`'s
    ``masked_fill_``) in one fused pass; ``where(|w| > t, w, 0)`` needs three passes and two temporaries,
    which made on-the-fly masking about 5x slower. ``threshold`` is a magnitude of this dtype, so passing
    it as a Python float is exact.
    """
    if threshold is None:
        return weight.detach().clone()
    return torch.nn.functional.hardshrink(weight, threshold)


def check_matches(unet: nn.Module, spec: PruneSpec) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The UNet's target weights, after checking that the spec was computed on a UNet of this shape."""
    weights = target_weights(unet, spec.target_filter)
    for g in GROUPS:
        n = sum(p.numel() for _, p in weights[g])
        if n != spec.groups[g].targets:
            raise CrdiffError(f"the prune spec was computed for a UNet with {spec.groups[g].targets} {g} target "
                              f"weights, this one has {n}; recompute the spec on this model")
    return weights


def prune_(unet: nn.Module, spec: PruneSpec) -> nn.Module:
    """Zero, in place, every target weight at or below its group's threshold; returns ``unet``."""
    weights = check_matches(unet, spec)
    with torch.no_grad():
        for g in GROUPS:
            threshold = spec.groups[g].threshold
            if threshold is not None:
                for _, p in weights[g]:
                    p.masked_fill_(p.abs() <= threshold, 0.0)
    return unet
