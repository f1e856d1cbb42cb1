"""Digests of large files, cached by the files' (size, modification time) so an untouched file is not re-read.

The cache is one JSON file in crdiff's cache folder (``$CRDIFF_CACHE/digests.json``), replaced
atomically; a missing, unreadable or foreign cache just means hashing again. An entry records the files the
digest was computed from, each with its size and modification time (ns), and when the hashing started. It is
used only while every one of those files still has the recorded size and modification time, and each was
last modified at least :data:`RACY_NS` before the hashing started: a file written just before (or while) it
was hashed could be changed again within the same timestamp tick (file systems store modification times
with a granularity of milliseconds to seconds), and is hashed again next time. A file changed in place gets
a new modification time, so its stale entry is never used; a change that keeps both size and modification
time (a disk error, a tool that restores the mtime) is not seen while the entry stands.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

CHUNK = 1 << 22
RACY_NS = 2 * 10**9  # coarser than any file system's timestamp granularity (FAT: 2 s)


def cache_file() -> Path:
    from crdiff_cli.storage.cache import cache_dir

    return cache_dir() / "digests.json"


def cached_digest(key: str, compute: Callable[[], tuple[str, Iterable[Path]]]) -> str:
    """The digest ``compute()`` returns, from the cache while the files it read are untouched.

    ``compute`` returns ``(digest, files)``: the hex digest and every file it read. ``key`` names what is
    digested (two digests of the same file need two keys); the first file should be the main one, since
    entries whose first file no longer exists are dropped.
    """
    entries = _load()
    entry = entries.get(key)
    if _trusted(entry):
        return entry["sha256"]
    started = time.time_ns()
    digest, files = compute()
    entries[key] = {"files": [_stamp(Path(f)) for f in files], "hashed_at": started, "sha256": digest}
    _save(entries)
    return digest


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``: from the cache when its size and mtime are unchanged, else by reading it."""
    path = Path(path).resolve()

    def compute() -> tuple[str, list[Path]]:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest(), [path]

    return cached_digest(str(path), compute)


def _stamp(path: Path) -> list:
    path = Path(path).resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _trusted(entry) -> bool:
    """Whether ``entry`` (of :func:`cached_digest`) still describes its files (see the module's docstring)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False
    files, started = entry.get("files"), entry.get("hashed_at")
    if not isinstance(files, list) or not files or not isinstance(started, int):
        return False  # also every entry of the cache's first layout ({"stamp", "sha256"}): hashed again
    for recorded in files:
        if not (isinstance(recorded, list) and len(recorded) == 3 and isinstance(recorded[0], str)):
            return False
        try:
            current = _stamp(Path(recorded[0]))
        except OSError:
            return False
        if current != recorded or current[2] > started - RACY_NS:
            return False
    return True


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(entries: dict) -> None:
    """Best effort: a read-only cache folder only costs a re-hash next time. Entries whose main file is
    gone (a deleted artifact, a bake's staging folder) are dropped, so the cache does not grow forever."""
    from crdiff_cli.storage.atomic import staging_name

    kept = {key: entry for key, entry in entries.items() if _main_file_exists(entry)}
    target = cache_file()
    tmp = staging_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)


def _main_file_exists(entry) -> bool:
    try:
        return os.path.exists(entry["files"][0][0])
    except (KeyError, IndexError, TypeError):
        return False  # the cache's first layout, or foreign: dropped
