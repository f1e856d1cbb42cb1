"""``generate --trace-poa``: where POA acts on a model, per step, as ``poa_trace.json`` and ``poa_trace.png``.

For every step that ran both passes (:class:`~crdiff_cli.dual.poa_steps.PoaTrace`): the size of the
difference ``delta = e_p - e_d``, its cosine with the previous such step's, and the share of the dense
output POA changes (``||e - e_d|| / ||e_d||``). A difference that barely turns from step to step is one a
refresh policy can reuse; steps where the share is small are steps a window can leave out. The plot shows
every image's curve (grey) and their mean (blue / orange); the JSON keeps the numbers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from crdiff_cli.pipelines.images import label_font, write_file
from crdiff_cli.pipelines.plot_panels import (AXIS, BLUE, BOTTOM, GAP, GREY, HEIGHT, LEFT, ORANGE, RIGHT, TOP, WIDTH,
                                              panel_for)

TRACE_JSON, TRACE_PNG = "poa_trace.json", "poa_trace.png"
FORMAT = "crdiff-poa-trace/1"


def write_poa_trace(out_dir: Path, entries: list[dict], about: dict) -> None:
    """Write the trace's JSON (``about``: model, k, ratios, policy) and its plot into ``out_dir``."""
    from PIL.PngImagePlugin import PngInfo

    text = json.dumps({"format": FORMAT, **about, "steps": entries}, indent=1) + "\n"
    write_file(out_dir / TRACE_JSON, text.encode("utf-8"))
    info = PngInfo()
    info.add_text("crdiff", json.dumps({"kind": "poa trace", **about}, sort_keys=True))
    image = trace_image(entries, f"POA per step: k={about.get('k')}, ratios {about.get('ratios')}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_file(out_dir / TRACE_PNG, buffer.getvalue())


def _curves(entries: list[dict], key: str) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """Per image, ``(step, value)`` points of ``key``; and the mean over images at each step."""
    per_image: dict[str, list[tuple[int, float]]] = {}
    for e in entries:
        if e[key] is not None:
            per_image.setdefault(str(e["image"]), []).append((e["step"], e[key]))
    by_step: dict[int, list[float]] = {}
    for points in per_image.values():
        for step, value in points:
            by_step.setdefault(step, []).append(value)
    return per_image, [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())]


def trace_image(entries: list[dict], title: str):
    """Two panels over the steps: ||delta|| (upper); share of the output changed and cos to the previous
    delta (lower)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 6), title[:140], fill="black", font=label_font(12))
    if not entries:
        draw.text((LEFT, HEIGHT // 2), "no step ran both passes", fill=AXIS, font=label_font(14))
        return image
    x_max = max(e["step"] for e in entries) + 1
    inner = HEIGHT - TOP - GAP - BOTTOM
    norms, norm_mean = _curves(entries, "delta_norm")
    shares, share_mean = _curves(entries, "share")
    _, cos_mean = _curves(entries, "cos_prev")
    upper = panel_for((LEFT, TOP + 14, WIDTH - RIGHT, TOP + 14 + inner // 2),
                      [v for points in norms.values() for _, v in points], x_max)
    lower = panel_for((LEFT, upper.box[3] + GAP, WIDTH - RIGHT, HEIGHT - BOTTOM),
                      [v for _, v in share_mean + cos_mean], x_max)
    upper.frame(draw, "||e_pruned - e_dense|| per step  (grey: each image, blue: mean)")
    lower.frame(draw, "blue: share of the output POA changes, ||e - e_dense|| / ||e_dense||;  orange: cos to the "
                      "previous step's difference")
    for points in norms.values():
        _line(draw, upper, points, GREY)
    for points, color in ((norm_mean, BLUE), (share_mean, BLUE), (cos_mean, ORANGE)):
        _line(draw, upper if points is norm_mean else lower, points, color)
    draw.text((LEFT, HEIGHT - 16), f"x axis: step (1..{x_max}); only steps that ran both passes are drawn",
              fill=AXIS, font=label_font(12))
    return image


def _line(draw, panel, points: list[tuple[int, float]], color) -> None:
    """A polyline through ``(step, value)`` points (steps 0-based; the axis counts from 1)."""
    if len(points) == 1:
        x, y = panel.xy(points[0][0] + 1, points[0][1])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    elif points:
        draw.line([panel.xy(step + 1, value) for step, value in points], fill=color, width=2)
