"""The search trace as a PNG: the score per step with the best-so-far, and the temperature schedule.

Drawn with PIL's ImageDraw (no plotting dependency, :mod:`crdiff_cli.pipelines.plot_panels`): two panels
sharing the step axis, each with labelled ticks on both axes. The upper one shows every evaluated
candidate's score (the scorer's mean score, higher is better; grey dots, failed candidates red, cache hits
hollow) and the best score so far (a blue step line); the lower one the temperature, where reheats and restarts (t-floor rule) show
as jumps. The PNG carries a ``crdiff`` text chunk, which marks it as crdiff's for ``--overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path

from crdiff_cli.pipelines.image_folder import is_crdiff_png
from crdiff_cli.pipelines.images import label_font
from crdiff_cli.pipelines.plot_panels import (AXIS, BLUE, BOTTOM, GAP, GREY, HEIGHT, LEFT, ORANGE, RED, RIGHT, TOP,
                                              WIDTH, panel_for, step_line)
from crdiff_cli.storage.atomic import OutputKind

TRACE = OutputKind("search trace", "a crdiff PNG text chunk", is_crdiff_png)


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
    score = panel_for((LEFT, TOP + 14, WIDTH - RIGHT, TOP + 14 + inner * 3 // 5), scores + best, n)
    temp = panel_for((LEFT, score.box[3] + GAP, WIDTH - RIGHT, HEIGHT - BOTTOM), temps, n)
    score.frame(draw, "score = mean score of the candidate's images, higher is better  (dots: candidates, red: "
                      "failed, hollow: cached; blue: best so far)")
    temp.frame(draw, "temperature T used for the acceptance test")
    for step, (e, value) in enumerate(zip(history, scores), start=1):
        x, y = score.xy(step, value)
        color = RED if e.error else GREY
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), outline=color, fill=None if e.cached else color)
    step_line(draw, score, best, BLUE)
    step_line(draw, temp, temps, ORANGE)
    draw.text((LEFT, HEIGHT - 16), f"x axis: step (1..{n}, the --init seeds included)", fill=AXIS, font=label_font(12))
    return image


def save_trace(history, title: str, path: Path) -> None:
    """Write :func:`trace_image` as a PNG at ``path``, tagged with a ``crdiff`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("crdiff", json.dumps({"kind": "search trace", "title": title}))
    trace_image(history, title).save(path, format="PNG", pnginfo=info)
