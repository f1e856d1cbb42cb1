"""SHA-256 of large files, cached by (size, modification time) so an untouched file is not re-read.

The cache is one JSON file in crdiff's cache folder (``$CRDIFF_CACHE/digests.json``), replaced
atomically; a missing, unreadable or foreign cache just means hashing again. A file changed in place
gets a new modification time, so its stale entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 22


def cache_file() -> Path:
    from crdiff_cli.storage.cache import cache_dir

    return cache_dir() / "digests.json"


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``: from the cache when its size and mtime are unchanged, else by reading it."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    entries = _load()
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    entries[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _save(entries)
    return digest.hexdigest()


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(entries: dict) -> None:
    """Best effort: a read-only cache folder only costs a re-hash next time."""
    from crdiff_cli.storage.atomic import staging_name

    target = cache_file()
    tmp = staging_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
