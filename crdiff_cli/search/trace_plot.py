"""The search trace as a PNG: the score per step with the best-so-far, and the temperature schedule.

Drawn with PIL's ImageDraw (no plotting dependency): two panels sharing the step axis, each with
labelled ticks on both axes. The upper one shows every evaluated candidate's score (the scorer's mean
score, higher is better; grey dots, failed candidates red, cache hits hollow) and the best score so
far (a blue step line); the lower one the temperature, where reheats and restarts (t-floor rule) show
as jumps. The PNG carries a ``crdiff`` text chunk, which marks it as crdiff's for ``--overwrite``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.pipelines.image_folder import is_crdiff_png
from crdiff_cli.pipelines.images import label_font
from crdiff_cli.storage.atomic import OutputKind

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, GAP, BOTTOM = 70, 20, 34, 44, 34
GREY, BLUE, RED, ORANGE, AXIS = (150, 150, 150), (30, 90, 200), (210, 40, 40), (220, 120, 20), (60, 60, 60)
GRID = (228, 228, 228)
Y_TICKS, X_TICKS = 5, 6
TRACE = OutputKind("search trace", "a crdiff PNG text chunk", is_crdiff_png)


@dataclass(frozen=True)
class _Panel:
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


def _panel(box, values: list[float], x_max: int) -> _Panel:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return _Panel(box, x_max, lo - pad, hi + pad)


def trace_image(history, title: str):
    """Render a search history (a sequence of :class:`crdiff_cli.search.runner.SearchStep`) as a PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 6), title[:140], fill="black", font=label_font(12))
    n = len(history)
    scores = [-e.record.energy for e in history]  # the annealer minimises energy = -mean score
    best = [-e.record.state.e_best for e in history]
    temps = [e.record.t for e in history]
    inner = HEIGHT - TOP - GAP - BOTTOM
    score = _panel((LEFT, TOP + 14, WIDTH - RIGHT, TOP + 14 + inner * 3 // 5), scores + best, n)
    temp = _panel((LEFT, score.box[3] + GAP, WIDTH - RIGHT, HEIGHT - BOTTOM), temps, n)
    score.frame(draw, "score = mean score of the candidate's images, higher is better  (dots: candidates, red: "
                      "failed, hollow: cached; blue: best so far)")
    temp.frame(draw, "temperature T used for the acceptance test")
    for step, (e, value) in enumerate(zip(history, scores), start=1):
        x, y = score.xy(step, value)
        color = RED if e.error else GREY
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), outline=color, fill=None if e.cached else color)
    _step_line(draw, score, best, BLUE)
    _step_line(draw, temp, temps, ORANGE)
    draw.text((LEFT, HEIGHT - 16), f"x axis: step (1..{n}, the --init seeds included)", fill=AXIS, font=label_font(12))
    return image


def save_trace(history, title: str, path: Path) -> None:
    """Write :func:`trace_image` as a PNG at ``path``, tagged with a ``crdiff`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("crdiff", json.dumps({"kind": "search trace", "title": title}))
    trace_image(history, title).save(path, format="PNG", pnginfo=info)


def _step_line(draw, panel: _Panel, values: list[float], color) -> None:
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
