"""MagnitudeHistogram (radix select over |w| bit patterns) against brute force: cat + abs + kthvalue."""

from __future__ import annotations

import pytest
import torch

from crdiff_cli.pruning import selection
from crdiff_cli.pruning.selection import MagnitudeHistogram

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def brute(tensors, m):
    flat = torch.cat([t.abs().flatten() for t in tensors])
    t = flat.kthvalue(m).values
    return t, int((flat <= t).sum())


def check(tensors, ms):
    hist = MagnitudeHistogram(tensors)
    n = sum(t.numel() for t in tensors)
    assert hist.numel == n
    for m in ms:
        value, count = hist.kth_smallest(m)
        ref, ref_count = brute(tensors, m)
        assert isinstance(value, float)
        # exact: the same number, and representable in the tensors' dtype without rounding
        assert value == float(ref), (m, value, float(ref))
        assert torch.tensor(value, dtype=tensors[0].dtype).item() == value
        assert count == ref_count, (m, count, ref_count)
        assert count >= m


def rank_set(n):
    return sorted({1, 2, n // 7, n // 3, n // 2, (2 * n) // 3, n - 1, n} - {0})


def random_tensors(dtype, seed, shapes=((17, 31), (64,), (8, 4, 3, 3), (1000,), (3, 333))):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        scale = 10.0 ** (i - 2)  # spread exponents so several high-digit bins are used
        out.append((torch.randn(shape, generator=g) * scale).to(dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tensors_match_kthvalue(dtype, seed):
    tensors = random_tensors(dtype, seed)
    n = sum(t.numel() for t in tensors)
    g = torch.Generator().manual_seed(100 + seed)
    check(tensors, rank_set(n) + torch.randint(1, n + 1, (20,), generator=g).tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_ties_both_signs_and_zeros(dtype):
    g = torch.Generator().manual_seed(7)
    # integers -5..5 times 0.25: 6 distinct magnitudes (0 included), each tied hundreds of times
    tensors = [(torch.randint(-5, 6, shape, generator=g).float() * 0.25).to(dtype) for shape in ((40, 25), (333,), (7, 7))]
    tensors.append(torch.tensor([0.0, -0.0, 0.25, -0.25, 1.25, -1.25], dtype=dtype))
    flat = torch.cat([t.abs().flatten() for t in tensors])
    n = flat.numel()
    assert len(flat.unique()) == 6
    # ranks at both edges of every tie run: the answer must jump exactly where kthvalue's does
    edges = flat.unique(return_counts=True)[1].cumsum(0).tolist()
    check(tensors, sorted({r for c in edges for r in (c - 1, c, c + 1) if 1 <= r <= n} | {1, n // 2}))
    # the count includes every tie at t, so it exceeds m inside a tie run
    hist = MagnitudeHistogram(tensors)
    value, count = hist.kth_smallest(1)
    assert value == 0.0 and count == int((flat == 0).sum()) > 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_and_negative_zero(dtype):
    tensors = [torch.zeros(10, dtype=dtype), -torch.zeros(5, dtype=dtype)]
    assert (tensors[1].view(torch.int16 if dtype != torch.float32 else torch.int32) != 0).all()  # really -0.0
    hist = MagnitudeHistogram(tensors)
    for m in (1, 7, 15):
        assert hist.kth_smallest(m) == (0.0, 15)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_magnitudes(dtype):
    info = torch.finfo(dtype)
    values = [info.tiny, info.tiny / 4, -info.tiny / 2, info.max, -info.max, float("inf"), float("-inf"),
              info.eps, -info.eps, 1.0, -1.0, 0.0]  # includes subnormals and infinities
    tensors = [torch.tensor(values, dtype=dtype), torch.tensor(values[::-1], dtype=dtype) * 0.5]
    n = sum(t.numel() for t in tensors)
    check(tensors, range(1, n + 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunking_across_tensor_boundaries(dtype, monkeypatch):
    """Small CHUNK: chunks split tensors and never straddle two; results must not change."""
    tensors = random_tensors(dtype, 3)
    n = sum(t.numel() for t in tensors)
    expected = [MagnitudeHistogram(tensors).kth_smallest(m) for m in rank_set(n)]
    monkeypatch.setattr(selection, "CHUNK", 37)
    assert [MagnitudeHistogram(tensors).kth_smallest(m) for m in rank_set(n)] == expected
    check(tensors, rank_set(n))


def test_noncontiguous_and_single_element():
    base = torch.randn(30, 40, generator=torch.Generator().manual_seed(5))
    check([base.t(), base[:, ::3]], rank_set(base.numel() + base[:, ::3].numel()))
    check([torch.tensor([-3.5])], [1])


def test_rank_out_of_range_and_bad_inputs():
    hist = MagnitudeHistogram([torch.randn(10)])
    for m in (0, -1, 11):
        with pytest.raises(ValueError):
            hist.kth_smallest(m)
    with pytest.raises(ValueError):
        MagnitudeHistogram([])
    with pytest.raises(ValueError):
        MagnitudeHistogram([torch.randn(3), torch.randn(3).half()])
    with pytest.raises(ValueError):
        MagnitudeHistogram([torch.arange(5)])
