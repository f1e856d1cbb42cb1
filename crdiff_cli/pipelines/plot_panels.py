"""Plot panels drawn with PIL (no plotting dependency): a box with labelled ticks mapping (step, value) to pixels.

Shared by the search trace and the POA trace; steps run from 1 to ``x_max`` along the x axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crdiff_cli.pipelines.images import label_font

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, GAP, BOTTOM = 70, 20, 34, 44, 34
GREY, BLUE, RED, ORANGE, AXIS = (150, 150, 150), (30, 90, 200), (210, 40, 40), (220, 120, 20), (60, 60, 60)
GRID = (228, 228, 228)
Y_TICKS, X_TICKS = 5, 6


@dataclass(frozen=True)
class Panel:
    """A plotting box with its data ranges: maps (step, value) to pixels."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    x_max: int
    y_lo: float
    y_hi: float

    def xy(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        span = (self.y_hi - self.y_lo) or 1.0
        return (left + (right - left) * (x - 1) / max(1, self.x_max - 1),
                bottom - (bottom - top) * (y - self.y_lo) / span)

    def decimals(self) -> int:
        """Enough decimals that neighbouring y ticks read differently (22.1436 and 22.1448, not 22.14 twice)."""
        step = (self.y_hi - self.y_lo) / (Y_TICKS - 1)
        return max(0, min(8, 1 - math.floor(math.log10(step)))) if step > 0 else 2

    def frame(self, draw, label: str) -> None:
        """Box, title, and labelled ticks with grid lines on both axes."""
        left, top, right, bottom = self.box
        draw.text((left, top - 14), label, fill=AXIS, font=label_font(12))
        for i in range(Y_TICKS):
            value = self.y_lo + (self.y_hi - self.y_lo) * i / (Y_TICKS - 1)
            _, y = self.xy(1, value)
            draw.line((left, y, right, y), fill=GRID)
            draw.text((4, y - 6), f"{value:.{self.decimals()}f}", fill=AXIS, font=label_font(12))
        for step in sorted({1 + round((self.x_max - 1) * i / (X_TICKS - 1)) for i in range(X_TICKS)}):
            x, _ = self.xy(step, self.y_lo)
            draw.line((x, top, x, bottom), fill=GRID)
            draw.text((x - 6, bottom + 3), str(step), fill=AXIS, font=label_font(12))
        draw.rectangle(self.box, outline=AXIS)


def panel_for(box, values: list[float], x_max: int) -> Panel:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return Panel(box, x_max, lo - pad, hi + pad)


def step_line(draw, panel: Panel, values: list[float], color) -> None:
    points = []
    for step, value in enumerate(values, start=1):
        if points:
            points.append((panel.xy(step, value)[0], panel.xy(step, values[step - 2])[1]))
        points.append(panel.xy(step, value))
    if len(points) > 1:
        draw.line(points, fill=color, width=2)
    else:
        x, y = points[0]
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
