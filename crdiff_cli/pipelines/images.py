"""Images as crdiff writes them: PNGs carrying their generation parameters, the manifest, comparison grids.

Every image is written to a temporary name and renamed, with the full generation parameters embedded as PNG
text (a ``crdiff`` JSON chunk and a human-readable ``parameters`` chunk) and collected in ``manifest.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from crdiff_cli import __version__
from crdiff_cli.storage.atomic import staging_name

if TYPE_CHECKING:
    from crdiff_cli.pipelines.generation import GenerationSettings

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "crdiff-images/1"  # marks a folder as a generate output (crdiff_cli.pipelines.image_folder)


@dataclass
class ImageRecord:
    """One written image and how it was made (the ``crdiff`` PNG chunk, a manifest entry)."""

    file: str
    prompt_index: int
    prompt: str
    seed: int
    variant: str  # "crdiff" or "dense"
    params: dict = field(default_factory=dict)


def crdiff_info(choice, spec, k: float, masks: str, policy=None) -> dict:
    """The model-info fields of a CR-Diff image (PNG ``crdiff`` chunk): k, ratios, where they came from, and
    the POA policy (``None``: full CR-Diff)."""
    from crdiff_cli.dual.poa_policy import PoaPolicy

    return dict(mode="crdiff", k=k, ratios=str(choice.ratios), ratios_origin=choice.origin,
                thresholds=spec.thresholds(), masks=masks, poa=(policy or PoaPolicy()).to_dict())


def image_params(prompt: str, seed: int, settings: GenerationSettings, model_info: dict) -> dict:
    return {"prompt": prompt, "negative_prompt": settings.negative_prompt, "seed": seed,
            "steps": settings.steps, "guidance": settings.guidance, "height": settings.resolution.height,
            "width": settings.resolution.width, "scheduler": settings.scheduler or "model default",
            **model_info, "crdiff_version": __version__}


def png_bytes(image, params: dict) -> bytes:
    """``image`` encoded as PNG with its parameters as text chunks (what :func:`save_png` writes)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("crdiff", json.dumps(params, sort_keys=True))
    info.add_text("parameters", human_parameters(params))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (a marked staging name, then rename)."""
    tmp = staging_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(image, path: Path, params: dict) -> None:
    """Write ``image`` with its parameters as PNG text chunks, atomically."""
    write_file(path, png_bytes(image, params))


def human_parameters(params: dict) -> str:
    """A1111-style ``parameters`` text: prompt, negative prompt, then ``key: value`` pairs."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    rest = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt")}
    lines.append(", ".join(f"{k}: {v}" for k, v in rest.items()))
    return "\n".join(lines)


LABEL_SIZE = 14  # Pillow's default font at its own 10 px draws spaces too narrow to read ("ratios0.3")


def label_font(size: int = LABEL_SIZE):
    """The font of every label crdiff draws on an image (Pillow's bundled one, scalable: nothing to install)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def difference_image(dense, crdiff) -> tuple[object, int, float]:
    """``|crdiff - dense|`` per pixel, amplified so that its largest value is visible:
    ``(image, gain, mean difference in levels of 255)``."""
    import numpy as np
    from PIL import Image

    diff = np.abs(np.asarray(crdiff, dtype=np.int16) - np.asarray(dense, dtype=np.int16))
    gain = int(max(1, min(64, 255 // max(1, int(diff.max())))))
    return Image.fromarray(np.minimum(diff * gain, 255).astype(np.uint8)), gain, float(diff.mean())


def compare_grid(pairs: list[tuple[int, object, object]], title: str):
    """One labelled grid: a row per seed, dense, CR-Diff, and their difference amplified (CR-Diff often
    changes an image by a few levels, invisible side by side)."""
    from PIL import Image, ImageDraw

    scale = -(-240 // pairs[0][1].size[0])  # small images are enlarged (nearest neighbour) so the labels fit
    rows = [(seed, dense, crdiff, *difference_image(dense, crdiff)) for seed, dense, crdiff in pairs]
    if scale > 1:
        enlarge = lambda im: im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)  # noqa: E731
        rows = [(seed, enlarge(d), enlarge(c), enlarge(x), gain, mean) for seed, d, c, x, gain, mean in rows]
        title += f"  (shown at {scale}x)"
    width, height = rows[0][1].size
    font, label_h = label_font(), LABEL_SIZE + 6
    grid = Image.new("RGB", (3 * width, len(rows) * (height + label_h) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 2), title[:160], fill="black", font=font)
    for row, (seed, dense, crdiff, diff, gain, mean) in enumerate(rows):
        top = label_h + row * (height + label_h)
        labels = (f"dense, seed {seed}", f"CR-Diff, seed {seed}", f"|CR-Diff - dense| x{gain}, mean {mean:.1f}")
        for col, (label, image) in enumerate(zip(labels, (dense, crdiff, diff))):
            draw.text((col * width + 2, top + 2), label, fill="black", font=font)
            grid.paste(image, (col * width, top + label_h))
    return grid


def write_manifest(out_dir: Path, records: list[ImageRecord], run: dict) -> None:
    tmp = staging_name(out_dir / MANIFEST)
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "run": run, "images": [asdict(r) for r in records]},
                              indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
