"""Image resolutions, written HEIGHTxWIDTH as in the CR-Diff paper (Table 6 and 7)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from crdiff_cli.errors import CrdiffError

MIN_SIDE = 8
MAX_SIDE = 8192

_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Resolution:
    """Height and width in pixels (HEIGHTxWIDTH: ``400x560`` is 400 high, 560 wide)."""

    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> "Resolution":
        match = _PATTERN.match(str(text))
        if not match:
            raise CrdiffError(f"resolution {text!r} is not HEIGHTxWIDTH; write it like 400x560 (height x width)")
        res = cls(int(match.group(1)), int(match.group(2)))
        for side in (res.height, res.width):
            if side % 8:
                raise CrdiffError(f"resolution {res} has a side that is not a multiple of 8; use e.g. "
                                  f"{_round8(res.height)}x{_round8(res.width)}")
            if not MIN_SIDE <= side <= MAX_SIDE:
                raise CrdiffError(f"resolution {res} is out of range; each side must be within {MIN_SIDE}..{MAX_SIDE} pixels")
        return res

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def aspect(self) -> float:
        return self.height / self.width

    def distance(self, other: "Resolution") -> float:
        """How far apart two resolutions are: log aspect ratio first, then log pixel count.

        Aspect ratio is what shapes composition, so it dominates; pixel count breaks ties.
        """
        return abs(math.log(self.aspect / other.aspect)) * 4 + abs(math.log(self.pixels / other.pixels))

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def _round8(side: int) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, round(side / 8) * 8))
