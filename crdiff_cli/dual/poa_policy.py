"""Which denoising steps run POA: a window of the schedule, what runs outside it, and a refreshed difference.

Full CR-Diff runs the dense and the pruned pass at every step (2 UNet passes per step). A policy cuts that:

- ``window`` ``(start, stop)``: fractions of the schedule in which POA runs. Step ``i`` of ``n`` is inside
  when ``start <= i / n < stop``; outside it one pass runs, the dense one (``outside="dense"``) or the
  pruned one (``"pruned"``). Cost: ``1 + f`` passes per step for a window covering a fraction ``f``.
- ``refresh`` N: inside the window, both passes run every N-th step (counted from the window's first step);
  the steps between run ONE pass and reuse the last measured difference ``delta = e_p - e_d``. Cost:
  ``1 + 1/N`` (for the whole schedule).

Which pass a cached step runs: ``e = e_d + k delta = e_p + (k - 1) delta``, so with the pruned pass the
stale difference is weighted by ``|k - 1|`` and with the dense pass by ``|k|``; the pass with the smaller
weight runs (pruned for ``k >= 0.5``: at the paper's k = 1.2-1.5 that error weight is 0.2-0.5 instead of
1.2-1.5). The default policy (window 0:1, refresh 1) is full CR-Diff, exactly as without a policy.

"The schedule" is the scheduler's list of distinct timesteps, noise first (a second-order scheduler visits
each twice; both visits are one step). An img2img run at strength s runs only the last s of it, so a window
is a range of noise levels, as in guidance-interval methods. This module imports no torch: commands check
the flags before loading anything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from crdiff_cli.errors import ParameterError

OUTSIDE_PASSES = ("dense", "pruned")
STEP_KINDS = ("both", "dense", "pruned", "cached")  # what a step runs; "cached": one pass + the last difference
_LABEL = re.compile(r"^(?:@(?P<window>[^/+]+)(?:\+(?P<outside>[a-z]+))?)?(?:/refresh(?P<refresh>\d+))?$")


@dataclass(frozen=True)
class PoaPolicy:
    """A POA policy: ``window`` (fractions of the schedule), the pass ``outside`` it, and ``refresh``."""

    window: tuple[float, float] = (0.0, 1.0)
    outside: str = "dense"
    refresh: int = 1

    def __post_init__(self):
        start, stop = self.window
        for value in (start, stop):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
                raise ParameterError("poa_interval", self.interval_text(), "must be START:STOP with 0 <= START <= "
                                     "STOP <= 1 (fractions of the schedule, e.g. 0:0.3)")
        if start > stop:
            raise ParameterError("poa_interval", self.interval_text(), "has START > STOP; write it as START:STOP "
                                 "with START <= STOP (e.g. 0:0.3)")
        object.__setattr__(self, "window", (float(start), float(stop)))
        if self.outside not in OUTSIDE_PASSES:
            raise ParameterError("poa_outside", repr(self.outside),
                                 f"is not a pass; use one of {', '.join(OUTSIDE_PASSES)}")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ParameterError("poa_refresh", self.refresh, "must be a whole number >= 1 (1: both passes at every "
                                 "step; N: every N-th step, the difference reused in between)")

    @classmethod
    def parse(cls, interval: str = "0:1", outside: str = "dense", refresh: int = 1) -> "PoaPolicy":
        """A policy from the command-line forms (``--poa-interval 0:0.3 --poa-outside dense --poa-refresh 4``)."""
        parts = str(interval).split(":")
        try:
            start, stop = (float(p) for p in parts)
        except ValueError:
            raise ParameterError("poa_interval", repr(interval), "is not START:STOP; write two fractions of the "
                                 "schedule, e.g. 0:0.3") from None
        return cls((start, stop), outside, refresh)

    @classmethod
    def from_label(cls, label: str) -> "PoaPolicy":
        """The policy a variant label names: ``@0:0.3``, ``@0.2:1+pruned``, ``/refresh4``, or both."""
        match = _LABEL.match(label)
        if match is None:
            raise ParameterError("variant", repr("crdiff" + label), "is not a POA policy; write crdiff@START:STOP, "
                                 "crdiff@START:STOP+pruned, crdiff/refreshN or crdiff@START:STOP/refreshN")
        return cls.parse(match["window"] or "0:1", match["outside"] or "dense", int(match["refresh"] or 1))

    @property
    def is_full(self) -> bool:
        """Whether this is full CR-Diff (both passes at every step): the default."""
        return self.window == (0.0, 1.0) and self.refresh == 1

    def interval_text(self) -> str:
        """``START:STOP``, each the shortest text that reads back as the same float (``0:0.3``)."""
        return ":".join(_shortest(x) for x in self.window)

    def label(self) -> str:
        """The variant suffix (``""`` for full CR-Diff, ``@0:0.3``, ``/refresh4``, ``@0:0.5+pruned/refresh2``)."""
        text = "" if self.window == (0.0, 1.0) else "@" + self.interval_text()
        if self.outside != "dense" and self.window != (0.0, 1.0):
            text += f"+{self.outside}"
        return text + (f"/refresh{self.refresh}" if self.refresh > 1 else "")

    def describe(self) -> str:
        """For people: ``full POA``, or the label without its ``@`` (``0:0.3``, ``0:0.5+pruned/refresh2``)."""
        return "full POA" if self.is_full else self.label().lstrip("@")

    def step_kind(self, index: int, total: int) -> str:
        """What step ``index`` (0-based) of ``total`` runs: ``both``, ``cached``, or one pass (``dense``/``pruned``)."""
        start, stop = self.window
        if not start <= index / total < stop:
            return self.outside
        if self.refresh == 1:
            return "both"
        first = next(j for j in range(total) if start <= j / total)
        return "both" if (index - first) % self.refresh == 0 else "cached"

    def passes(self, total: int) -> int:
        """UNet passes (per batch) for ``total`` steps: 2 for a step with both passes, 1 otherwise."""
        return sum(2 if self.step_kind(i, total) == "both" else 1 for i in range(total))

    def cost(self, total: int) -> float:
        """Passes per step relative to the dense model (full CR-Diff: 2.0)."""
        return self.passes(total) / total

    def to_dict(self) -> dict:
        return {"interval": self.interval_text(), "outside": self.outside, "refresh": self.refresh}

    @classmethod
    def from_dict(cls, data: dict | None) -> "PoaPolicy":
        """Inverse of :meth:`to_dict`; None (a record from before policies) is full CR-Diff."""
        if data is None:
            return cls()
        return cls.parse(data["interval"], data["outside"], int(data["refresh"]))


def _shortest(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def cached_pass(k: float) -> str:
    """The pass a cached step runs: the one whose output the stale difference is weighted least against."""
    return "pruned" if k >= 0.5 else "dense"
