"""What makes a folder a ``crdiff generate`` output, so ``--out`` never mixes runs or deletes a user's files.

Every PNG crdiff writes carries a ``crdiff`` text chunk (its generation parameters), and the folder's
``manifest.json`` names ``crdiff-images/1`` (a ``--trace-poa`` run's ``poa_trace.json`` names its own
format). A folder holding only such files (and crdiff's own staging) is a previous output: ``--overwrite``
empties it before the new run writes there. Anything else in it (a user's photo, notes) makes it someone
else's folder, which crdiff refuses to touch.
"""

from __future__ import annotations

import json
from pathlib import Path

from crdiff_cli.pipelines.images import MANIFEST
from crdiff_cli.pipelines.poa_trace_file import FORMAT as TRACE_FORMAT, TRACE_JSON
from crdiff_cli.storage.atomic import OutputKind, clean_stale, is_staging, json_marker


def is_crdiff_png(path: Path) -> bool:
    """Whether ``path`` is a PNG with crdiff's ``crdiff`` text chunk (images, grids, search traces)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and "crdiff" in getattr(image, "text", {})
    except Exception:  # PIL raises many types for a file that is not an image
        return False


def _is_manifest(path: Path) -> bool:
    if json_marker(path, "crdiff-images/"):
        return True
    try:  # manifests written before the format field: {"run": ..., "images": [...]}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == {"run", "images"}


def _is_ours(entry: Path) -> bool:
    if entry.name == MANIFEST:
        return _is_manifest(entry)
    if entry.name == TRACE_JSON:
        return json_marker(entry, TRACE_FORMAT)
    if is_staging(entry.name):
        return True
    return entry.is_file() and entry.suffix.lower() == ".png" and is_crdiff_png(entry)


def is_image_folder(folder: Path) -> bool:
    """Whether every entry of ``folder`` was written by ``crdiff generate``."""
    return folder.is_dir() and all(_is_ours(entry) for entry in folder.iterdir())


def clear_image_folder(folder: Path) -> None:
    """Empty a previous ``crdiff generate`` output (call :func:`is_image_folder` first, via check_output)."""
    clean_stale(folder)
    for entry in Path(folder).iterdir():
        if _is_ours(entry) and not is_staging(entry.name):
            entry.unlink()


IMAGES = OutputKind("generate output folder", f"{MANIFEST} and crdiff-tagged PNGs only", is_image_folder,
                    folder=True)
