"""Near-free exact thresholds for a search's nearby ratios: a sorted window of magnitudes per group.

:class:`~crdiff_cli.pruning.selection.MagnitudeHistogram` answers a new rank with a second radix pass over the
whole group (~0.2-1.5 s for an SD1.5 group on 2 CPU cores). An annealing search asks for ranks close
to the previous ones (late steps move a ratio by ~0.005), so :class:`RankWindow` keeps, per group, the
magnitude bit patterns of every weight whose rank lies within ``frac`` of a missed rank (either
side), sorted. A rank inside such a window is then a lookup — the same exact answer as the radix
select, ties included — and a rank outside all of them costs one pass that collects a new window.
The last few windows are kept, because after a rejected neighbour the next one starts again from
the current candidate. Extra memory: up to ``keep * 2 * frac`` of the group's weights as integers
(8% of the up group, ~33 MB, on SD1.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crdiff_cli.pruning.selection import MagnitudeHistogram

WINDOW = 0.01  # fraction of a group's weights kept on each side of a missed rank
WINDOWS = 4  # windows kept per group: a rejected neighbour's window must not evict the current one's


@dataclass(frozen=True)
class _Window:
    first: int  # inclusive range of high-digit bins whose magnitudes it holds, sorted
    last: int
    below: int  # magnitudes below the window
    patterns: torch.Tensor


class RankWindow:
    """``kth_smallest`` of a :class:`MagnitudeHistogram`, answered from a sorted window when it can be."""

    def __init__(self, histogram: MagnitudeHistogram, frac: float = WINDOW, keep: int = WINDOWS):
        self.histogram, self.frac, self.keep = histogram, frac, keep
        self._windows: list[_Window] = []  # most recently used last
        self.misses = 0

    def kth_smallest(self, m: int) -> tuple[float, int]:
        h = self.histogram
        if h.low_bits == 0 or not 1 <= m <= h.numel:  # nothing to gain / let the histogram raise
            return h.kth_smallest(m)
        high = int(torch.searchsorted(h.cumulative, m))
        hits = [w for w in self._windows if w.first <= high <= w.last]
        window = hits[0] if hits else self._collect(m)
        self._windows = [w for w in self._windows if w is not window][-(self.keep - 1):] + [window]
        pattern = window.patterns[m - window.below - 1]
        pruned = window.below + int(torch.searchsorted(window.patterns, pattern, right=True))
        return h.value_of(int(pattern)), pruned

    def _collect(self, m: int) -> _Window:
        """One pass: the bit patterns of the high bins spanning ranks m +- frac * n, sorted."""
        h = self.histogram
        span = max(1, math.ceil(self.frac * h.numel))
        first = int(torch.searchsorted(h.cumulative, max(1, m - span)))
        last = int(torch.searchsorted(h.cumulative, min(h.numel, m + span)))
        kept = []
        for chunk in h.chunks():
            bits = h.magnitude_bits(chunk)
            high = bits >> h.low_bits
            kept.append(bits[(high >= first) & (high <= last)])
        self.misses += 1
        below = int(h.cumulative[first - 1]) if first else 0
        return _Window(first, last, below, torch.cat(kept).sort().values)


def search_stats(unet):
    """:class:`~crdiff_cli.pruning.spec.PruneStats` of ``unet`` whose thresholds come through a RankWindow."""
    from crdiff_cli.pruning.spec import PruneStats

    stats = PruneStats(unet)
    stats.histograms = {g: RankWindow(h) for g, h in stats.histograms.items()}
    return stats
