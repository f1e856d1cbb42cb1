"""crdiff's on-disk cache folder (built tiny models, file digests): ``$CRDIFF_CACHE`` or ``~/.cache/crdiff``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where crdiff keeps what it can rebuild: ``$CRDIFF_CACHE`` or ``~/.cache/crdiff``."""
    return Path(os.environ.get("CRDIFF_CACHE") or Path.home() / ".cache" / "crdiff")
