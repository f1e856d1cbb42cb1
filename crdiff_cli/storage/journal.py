"""Journals: append-only JSONL files that make `crdiff search` and `crdiff evaluate` survive a kill.

Described for the search (``kind="search"``); `crdiff evaluate` journals its scores the same way
(``kind="evaluation"``: one line per scored image and metric).

Line 1 is a header naming the search (``identity``: model, resolution, prompts hash, scorer, steps,
image seeds, the annealer's config, ...). Every later line is one annealer step, written as soon as it
is scored and made durable (``flush`` + ``fsync``) before the next candidate is generated. Each line
carries the annealer's full state after that step (RNG included), so resuming from the last line
continues the search exactly where it stopped.

A process killed while writing can leave a torn final line (no newline, or not valid JSON). That
step was never durable, so on resume the torn tail is cut off and the step runs again; a line that
fails to parse anywhere else means the file was damaged, and resume refuses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from crdiff_cli.errors import CrdiffError

# /2 of the search journal: the reference code's loop move for move
VERSIONS = {"search": 2, "evaluation": 1}
OLD_FORMATS = ("crdiff-search-journal/1",)  # written by an older search rule: its states cannot continue here


def journal_format(kind: str) -> str:
    """The header's ``format`` of a journal of ``kind`` (``search``, ``evaluation``)."""
    return f"crdiff-{kind}-journal/{VERSIONS[kind]}"


FORMAT = journal_format("search")


def is_journal(path: Path, kind: str = "search") -> bool:
    """Whether ``path`` is a crdiff journal of ``kind`` (of this or an older format): line 1 names the format
    (or is that line, torn by a kill). Nothing else is ever modified as a journal."""
    formats = {journal_format(kind), *(f for f in OLD_FORMATS if f.startswith(f"crdiff-{kind}-"))}
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError:
        return False
    if not first.endswith(b"\n"):  # how open_journal writes line 1, torn
        return any(first.startswith(b'{"format":"' + f.encode() + b'"') for f in formats)
    try:
        header = json.loads(first)
    except ValueError:
        return False
    return isinstance(header, dict) and header.get("format") in formats


def default_journal_path(profile: Path) -> Path:
    """``best.json`` -> ``best.journal.jsonl`` in the same folder."""
    return profile.with_name(f"{profile.stem}.journal.jsonl")


def read_journal(path: Path, kind: str = "search") -> tuple[dict | None, list[dict], int]:
    """``(header, entries, durable_bytes)``; a torn final line is left out of both and of the byte count."""
    data = Path(path).read_bytes()
    lines, durable, parsed = data.split(b"\n"), 0, []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is the text after the last newline
        try:
            parsed.append(json.loads(line))
        except ValueError:
            if number < len(lines) - 1:
                raise CrdiffError(f"journal {path} is damaged at line {number} (not JSON); it cannot be resumed: "
                                  f"start a new {kind} (--overwrite) or fix the file") from None
            break  # torn last line that happens to end in a newline byte: treat as not written
        durable += len(line) + 1
    if not parsed:
        return None, [], durable
    header = parsed[0]
    if header.get("format") in OLD_FORMATS:
        raise CrdiffError(f"journal {path} was written by an older crdiff whose search rule differs "
                          f"({header['format']}); it cannot be resumed: start a new search (--overwrite) or "
                          "use another --journal")
    if header.get("format") != journal_format(kind):
        raise CrdiffError(f"{path} is not a crdiff {kind} journal (expected \"format\": \"{journal_format(kind)}\" "
                          "on line 1)")
    return header, parsed[1:], durable


def check_identity(path: Path, header: dict, identity: dict, kind: str = "search") -> None:
    """Refuse to resume a journal written by a search with a different definition."""
    theirs, identity = _flat(header.get("identity", {})), _flat(identity)
    differ = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
    if "prompts_sha256" in differ:  # a hash says nothing to a person: name the difference instead
        differ = ["the prompts differ"] + [k for k in differ if k not in ("prompts", "prompts_sha256")]
    if differ:
        shown = "; ".join(k if k == "the prompts differ" else
                          f"{k}: journal {_short(theirs.get(k))} vs now {_short(identity.get(k))}" for k in differ[:3])
        raise CrdiffError(f"journal {path} belongs to a different {kind} ({shown}); resume with the same "
                          f"settings, or start a new {kind} with another {'--journal' if kind == 'search' else '--out'} "
                          "or --overwrite")


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"anneal": {"iters": 6}}`` -> ``{"anneal.iters": 6}``, so a mismatch names the exact setting."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_journal(path: Path, identity: dict | None, *, resume: bool, overwrite: bool,
                  kind: str = "search") -> list[dict]:
    """Validate the journal for a new or resumed search without writing; returns the entries to resume from.

    ``identity=None`` checks everything but the identity (for a caller that cannot build it yet).
    """
    path = Path(path)
    if resume and overwrite:
        raise CrdiffError("--resume and --overwrite contradict each other; pass only one")
    if not path.parent.is_dir():
        from crdiff_cli.storage.atomic import make_folder

        make_folder(path.parent, f"for journal {path.name}")
    if (path.exists() or path.is_symlink()) and not (path.is_file() and is_journal(path, kind)):
        what = "an empty file" if path.is_file() and path.stat().st_size == 0 else "a folder" if path.is_dir() \
            else f"not a crdiff {kind} journal"
        raise CrdiffError(f"{path} is {what} (line 1 of a journal names \"{journal_format(kind)}\"); crdiff "
                          "never modifies it: pass another " + ("--journal" if kind == "search" else "--out"))
    if not resume:
        if path.exists() and not overwrite:
            raise CrdiffError(f"journal {path} already exists; continue that {kind} with --resume, or start "
                              "over with --overwrite")
        return []
    if not path.is_file():
        raise CrdiffError(f"no journal at {path} to resume; run without --resume to start a {kind}")
    header, entries, _ = read_journal(path, kind)
    if header is not None and identity is not None:
        check_identity(path, header, identity, kind)
    return entries


class Journal:
    """Appends durable lines to a journal opened for a new search or a resume (see :func:`open_journal`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "ab")

    def append(self, entry: dict) -> None:
        """Write one line and force it to disk before returning (a crash after this keeps it)."""
        self._file.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def open_journal(path: Path, identity: dict, *, resume: bool, overwrite: bool,
                 kind: str = "search") -> tuple[Journal, list[dict]]:
    """Open for appending: a fresh file with a header, or the resumed one cut back to its durable lines."""
    path = Path(path)
    entries = check_journal(path, identity, resume=resume, overwrite=overwrite, kind=kind)
    if resume:
        header, _, durable = read_journal(path, kind)
        os.truncate(path, durable)  # drop a torn final line: that step will run again
    else:
        header = None
        path.unlink(missing_ok=True)
    journal = Journal(path)
    if header is None:  # new search, or a kill tore the very first line
        journal.append({"format": journal_format(kind), "identity": identity})
        _fsync_dir(path.parent)
    return journal, entries


def _fsync_dir(folder: Path) -> None:
    """Make the new file's directory entry durable too (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
