"""RankWindow (crdiff_cli.search.thresholds) gives exactly MagnitudeHistogram's answers, faster nearby."""

from __future__ import annotations

import pytest
import torch

from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.selection import MagnitudeHistogram
from crdiff_cli.pruning.spec import PruneStats
from crdiff_cli.search.thresholds import RankWindow, search_stats


def tensors(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(300, 70, generator=g), torch.randn(5000, generator=g) * 3, torch.zeros(400),
          torch.randn(64, 64, generator=g).round(decimals=2)]  # zeros and many ties
    ts.append(-ts[3])  # the same magnitudes with the other sign
    return [t.to(dtype) for t in ts]


@pytest.mark.parametrize("seed", range(3))
def test_every_rank_matches_the_radix_select(seed):
    ts = tensors(seed)
    reference, window = MagnitudeHistogram(ts), RankWindow(MagnitudeHistogram(ts), frac=0.01)
    n = reference.numel
    g = torch.Generator().manual_seed(seed)
    walk = [1, n, n // 2] + [int(x) for x in torch.randint(1, n + 1, (200,), generator=g)]
    walk += list(range(n // 3, n // 3 + 300)) + list(range(n - 50, n + 1))
    for m in walk:
        assert window.kth_smallest(m) == reference.kth_smallest(m), m


def test_nearby_ranks_are_lookups_and_far_ones_recentre():
    window = RankWindow(MagnitudeHistogram(tensors(0)), frac=0.02)
    n = window.histogram.numel
    window.kth_smallest(n // 3)
    for m in range(n // 3 - n // 100, n // 3 + n // 100):
        window.kth_smallest(m)
    assert window.misses == 1
    window.kth_smallest(n * 9 // 10)
    assert window.misses == 2


def test_half_precision_passes_through_and_bad_ranks_raise():
    ts = tensors(1, torch.float16)
    window, reference = RankWindow(MagnitudeHistogram(ts)), MagnitudeHistogram(ts)
    assert window.kth_smallest(1000) == reference.kth_smallest(1000) and window.misses == 0
    with pytest.raises(ValueError, match="outside"):
        RankWindow(MagnitudeHistogram(tensors(1))).kth_smallest(0)


def test_search_stats_give_the_same_specs_as_prune_stats(tiny_readonly):
    unet = tiny_readonly["tiny"].unet
    plain, windowed = PruneStats(unet), search_stats(unet)
    for ratios in [(0.3, 0.3, 0.3), (0.3, 0.305, 0.3), (0.31, 0.305, 0.29), (0.75, 0.1, 0.5), (0.0, 0.0, 0.0)]:
        assert windowed.spec(Ratios(*ratios)) == plain.spec(Ratios(*ratios))
    assert all(isinstance(h, RankWindow) for h in windowed.histograms.values())
