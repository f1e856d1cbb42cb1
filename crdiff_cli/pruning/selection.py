"""Exact k-th smallest magnitude over many tensors, without concatenating them.

The group-global threshold is the m-th smallest ``|w|`` over up to ~100M weights spread over dozens of
tensors. ``torch.cat`` + ``kthvalue`` costs a full copy of the group and a slow selection. Instead we
radix-select on bit patterns: for IEEE floats with the sign bit cleared, the integer order of the bit
pattern equals the order of the magnitude, so a histogram of the high bits finds the bin holding the
m-th element, and a histogram of the low bits inside that bin finds its exact value. Work is done in
chunks, so the extra memory is a few chunk-sized temporaries, and the high-bit histogram is kept as a
reusable statistic: a new ratio only needs the (cheaper) second pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK = 1 << 22  # elements per temporary; bounds extra memory to a few x 16 MB

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_HIGH_BITS = 15  # the high digit: the 15 bits below the sign bit


class MagnitudeHistogram:
    """The high-digit histogram of ``|w|`` over a group of same-dtype tensors (first radix pass)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        if not tensors:
            raise ValueError("a magnitude histogram needs at least one tensor")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _INT_VIEW:
            raise ValueError(f"target weights must share one float dtype (fp32/fp16/bf16), got {sorted(map(str, dtypes))}")
        self.tensors = list(tensors)
        self.dtype = next(iter(dtypes))
        self.bits = torch.finfo(self.dtype).bits
        self.low_bits = self.bits - 1 - _HIGH_BITS
        self.numel = sum(t.numel() for t in self.tensors)
        counts = torch.zeros(1 << _HIGH_BITS, dtype=torch.int64, device=self.tensors[0].device)
        for chunk in self.chunks():
            counts += torch.bincount(self._high(chunk), minlength=1 << _HIGH_BITS)
        self.cumulative = counts.cumsum(0).cpu()

    def kth_smallest(self, m: int) -> tuple[float, int]:
        """The m-th smallest magnitude (1-indexed) and how many magnitudes are <= it (ties included)."""
        if not 1 <= m <= self.numel:
            raise ValueError(f"rank {m} outside 1..{self.numel}")
        high = int(torch.searchsorted(self.cumulative, m))
        below = int(self.cumulative[high - 1]) if high else 0
        in_bin = int(self.cumulative[high]) - below
        if self.low_bits == 0:
            return self.value_of(high), below + in_bin
        low_counts = torch.zeros(1 << self.low_bits, dtype=torch.int64, device=self.tensors[0].device)
        mask_low = (1 << self.low_bits) - 1
        for chunk in self.chunks():
            bits = self.magnitude_bits(chunk)
            hits = bits[(bits >> self.low_bits) == high]
            if hits.numel():
                low_counts += torch.bincount(hits & mask_low, minlength=1 << self.low_bits)
        low_cum = low_counts.cumsum(0).cpu()
        low = int(torch.searchsorted(low_cum, m - below))
        return self.value_of((high << self.low_bits) | low), below + int(low_cum[low])

    def chunks(self):
        """The group's weights as flat chunks of at most CHUNK elements (bounded temporaries)."""
        for t in self.tensors:
            yield from t.detach().reshape(-1).split(CHUNK)

    def magnitude_bits(self, chunk: torch.Tensor) -> torch.Tensor:
        """Bit patterns of ``|chunk|`` as integers: their order is the order of the magnitudes."""
        return chunk.view(_INT_VIEW[self.dtype]) & ((1 << (self.bits - 1)) - 1)

    def _high(self, chunk: torch.Tensor) -> torch.Tensor:
        return (self.magnitude_bits(chunk) >> self.low_bits).int()

    def value_of(self, pattern: int) -> float:
        """The magnitude whose bit pattern is ``pattern``, as an exact Python float."""
        return float(torch.tensor([pattern], dtype=_INT_VIEW[self.dtype]).view(self.dtype)[0])
