"""Block-wise pruning ratios ``r = (r_down, r_mid, r_up)``, written ``D/M/U`` (Table 6's order)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from crdiff_cli.errors import CrdiffError

GROUPS = ("down", "mid", "up")


@dataclass(frozen=True)
class Ratios:
    """Fraction of target weights pruned in the down, mid and up block groups, each in [0, 1)."""

    down: float
    mid: float
    up: float

    def __post_init__(self):
        for group, value in zip(GROUPS, self.as_tuple()):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value < 1.0:
                raise CrdiffError(f"{group} ratio {value!r} is outside [0, 1); each ratio is the fraction of "
                                  "weights to prune, e.g. 0.3")

    @classmethod
    def parse(cls, text: str) -> "Ratios":
        parts = str(text).split("/")
        if len(parts) != 3:
            raise CrdiffError(f"ratios {text!r} must be three numbers DOWN/MID/UP, e.g. 0.319/0.240/0.192")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise CrdiffError(f"ratios {text!r} must be three numbers DOWN/MID/UP, e.g. 0.319/0.240/0.192") from None
        return cls(*values)

    @classmethod
    def from_dict(cls, data: dict) -> "Ratios":
        return cls(*(float(data[g]) for g in GROUPS))

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.down, self.mid, self.up)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(GROUPS, self.as_tuple()))

    def __getitem__(self, group: str) -> float:
        return self.as_dict()[group]

    def __str__(self) -> str:
        return "/".join(f"{v:g}" for v in self.as_tuple())
