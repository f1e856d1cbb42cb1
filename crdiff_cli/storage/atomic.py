"""How crdiff writes outputs: checked first, staged under a marked hidden name, shared, then renamed.

Every command's output goes through this module, so four promises hold for all of them:

- **Checked before any work.** :func:`check_output` refuses, before a model is loaded, an output that
  exists (unless ``--overwrite``), one that crdiff did not write (``--overwrite`` only replaces a
  previous crdiff output of the same :class:`OutputKind`, recognised by its marker), the folder the
  user is in, and a folder that cannot be written (read-only, no permission, no space). A missing
  parent folder is created (:func:`make_folder`), as ``mkdir -p`` would.
- **Whole or absent.** :func:`atomic_path` / :func:`staging` write to a hidden sibling and rename it
  into place at the end; an error or Ctrl-C removes it. A full disk mid-write is one error line.
- **Shareable.** Staged outputs get the permissions the user's umask gives a new file or folder
  (``tempfile`` creates them private, 0600/0700; another account could not read them).
- **No debris.** Staging names carry a crdiff marker, the host, the boot and the pid
  (``.NAME.crdiff-tmp-HHHHHHHHBBBBBBBB-PID-xxxx``), so the next run in the same folder removes what a
  killed process (SIGKILL, OOM) left, and only that: crdiff's own staging whose process is gone.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.errors import CrdiffError

MIN_FREE_BYTES = 1 << 20  # below this a folder counts as full: even a profile would fail to write
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}
# Writers in Rust/C++ (safetensors, onnx, torch) report OS errors as text in their own exception types.
_WRITE_ERROR_TEXT = {"no space left on device": "no space left on the device",
                     "os error 28": "no space left on the device", "disk quota exceeded": "disk quota exceeded",
                     "read-only file system": "the file system is read-only", "os error 30": "the file system is read-only"}
_STAGED = re.compile(r"^\.(?P<name>.+)\.crdiff-(?P<what>tmp|old)-(?P<host>[0-9a-f]{8})(?P<boot>[0-9a-f]{8})-"
                     r"(?P<pid>\d+)(?:-.*)?$")


@dataclass(frozen=True)
class OutputKind:
    """One kind of crdiff output and how to recognise one crdiff wrote (``is_ours``), for ``--overwrite``.

    ``marker`` names what identifies it, for the refusal message (e.g. ``crdiff_prune.json``).
    """

    noun: str
    marker: str
    is_ours: Callable[[Path], bool]
    folder: bool = False


def json_marker(path: Path, format_prefix: str) -> bool:
    """Whether ``path`` is a JSON object whose ``"format"`` starts with ``format_prefix``."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(format_prefix)


def folder_files(folder: Path) -> set[str]:
    """Every file (or link) under ``folder``, as POSIX paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink()}


def lists_every_file(folder: Path, record: str, format_prefix: str) -> bool:
    """Whether ``folder`` is a crdiff output whose JSON ``record`` (``"format"`` starting with ``format_prefix``)
    lists, under ``"files"``, every file now in it: one with a file a user added since is not crdiff's to replace."""
    import json

    try:
        data = json.loads((Path(folder) / record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith(format_prefix):
        return False
    listed = data.get("files")
    return isinstance(listed, (list, dict)) and folder_files(folder) <= set(map(str, listed)) | {record}


def check_output(path: Path, overwrite: bool, kind: OutputKind) -> None:
    """Refuse an output that cannot or must not be written; also clears stale staging in its folder."""
    path = Path(path)
    _refuse_working_folder(path)
    parent = path.parent
    make_folder(parent, f"for output {path.name}")
    clean_stale(parent)
    if path.exists() or path.is_symlink():
        _check_replaceable(path, overwrite, kind)
    check_writable(parent)


def _refuse_working_folder(path: Path) -> None:
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise CrdiffError(f"output {path} is the folder you are working in (or contains it); pass a new name, "
                          "e.g. --out ./result")


def _check_replaceable(path: Path, overwrite: bool, kind: OutputKind) -> None:
    if kind.folder and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty folder holds nothing to lose
    if path.is_dir() != kind.folder or path.is_symlink():
        shape = "a folder" if kind.folder else "a file"
        raise CrdiffError(f"output {path} exists and is not {shape}; crdiff writes the {kind.noun} as {shape}: "
                          "choose another --out")
    if not kind.is_ours(path):
        raise CrdiffError(f"output {path} exists and is not a {kind.noun} written by crdiff (no {kind.marker}); "
                          "crdiff never replaces what it did not write, even with --overwrite: choose another --out")
    if not overwrite:
        raise CrdiffError(f"output {path} already exists; choose another --out or pass --overwrite to replace it")


def make_folder(folder: Path, purpose: str = "") -> None:
    """Create ``folder`` and its missing parents, as ``mkdir -p`` and ``save_pretrained`` do, with the umask's
    permissions; first refuse, in one line, a path through a file or a place where nothing can be written."""
    folder = Path(folder)
    if folder.is_dir():
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        where = "is not a folder" if existing == folder else f"cannot be made: {existing} is not a folder"
        raise CrdiffError(f"the folder {folder} {purpose + ' ' if purpose else ''}{where}; choose another path")
    check_writable(existing)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CrdiffError(f"cannot create the folder {folder} ({(exc.strerror or str(exc)).lower()}); "
                          "choose another path") from None


def check_writable(folder: Path) -> None:
    """Refuse a folder where nothing can be written (read-only, no permission) or that is full."""
    folder = Path(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".probe.crdiff-tmp-{_machine_tag()}-{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CrdiffError(f"cannot write in {folder} ({(exc.strerror or str(exc)).lower()}); choose another --out") from None
    if shutil.disk_usage(folder).free < MIN_FREE_BYTES:
        raise CrdiffError(f"no space left in {folder}; free some space or choose another --out")


@contextmanager
def atomic_path(path: Path, overwrite: bool = False, *, kind: OutputKind, directory: bool = False):
    """Yield a staging sibling of ``path``; on success it replaces ``path`` (shared), on any error it is removed."""
    path = Path(path)
    check_output(path, overwrite, kind)
    with staging(path, directory=directory) as tmp:
        yield tmp
        with write_errors(path):
            share(tmp)
            _replace(tmp, path)


@contextmanager
def staging(path: Path, *, directory: bool = True):
    """A hidden staging folder (or file) beside ``path``, marked as crdiff's; removed when the block ends.

    Write errors inside the block (full disk, read-only file system) become one :class:`CrdiffError`.
    Move what it holds into place inside the block; whatever is left is removed.
    """
    path = Path(path)
    prefix = f"{_staging_base(path, 'tmp')}-"
    with write_errors(path):
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    try:
        with write_errors(path):
            yield tmp
    finally:
        _remove(tmp)


def staging_name(path: Path) -> Path:
    """A marked temporary name beside ``path`` for a single-file write-then-rename by this process."""
    return Path(path).with_name(f"{_staging_base(Path(path), 'tmp')}-f")


@contextmanager
def write_errors(path: Path):
    """Turn a failed write (no space, read-only, no permission) into one :class:`CrdiffError` line."""
    try:
        yield
    except CrdiffError:
        raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise CrdiffError(f"cannot write {path}: {(exc.strerror or str(exc)).lower()}; free some space or choose "
                          "another --out") from None
    except Exception as exc:
        text = str(exc).lower()
        reason = next((why for needle, why in _WRITE_ERROR_TEXT.items() if needle in text), None)
        if reason is None:
            raise
        raise CrdiffError(f"cannot write {path}: {reason}; free some space or choose another --out") from None


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX offers no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(path: Path) -> None:
    """Give ``path`` (recursively) the permissions a new file or folder gets under the user's umask."""
    path = Path(path)
    mask = current_umask()
    entries = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def clean_stale(folder: Path) -> list[Path]:
    """Remove crdiff staging left in ``folder`` by processes that are gone; returns what was removed.

    Only names with crdiff's marker count, and only from this host: from an earlier boot (every
    process of it is gone) or from this boot with a pid that no longer runs. A set-aside old output
    (``.NAME.crdiff-old-...``) whose replacement never landed is put back instead of removed.
    """
    removed = []
    host, boot = _machine_tag()[:8], _machine_tag()[8:]
    try:
        names = [entry.name for entry in Path(folder).iterdir()]
    except OSError:
        return removed
    for name in names:
        match = _STAGED.match(name)
        if not match or match["host"] != host:
            continue
        if match["boot"] == boot and _alive(int(match["pid"])):
            continue
        entry, target = Path(folder) / name, Path(folder) / match["name"]
        if match["what"] == "old" and not (target.exists() or target.is_symlink()):
            entry.rename(target)  # killed between moving the old output aside and renaming the new one in
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def is_staging(name: str) -> bool:
    """Whether a file name is crdiff staging (of any process, alive or not)."""
    return _STAGED.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@functools.lru_cache(maxsize=1)
def _machine_tag() -> str:
    """16 hex digits: 8 for the host name, 8 for the boot (Linux boot id; elsewhere a constant)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:8]  # noqa: E731
    return digest(socket.gethostname()) + digest(boot)


def _staging_base(path: Path, what: str) -> str:
    """``.NAME.crdiff-WHAT-TAG-PID``: what :data:`_STAGED` recognises."""
    return f".{path.name}.crdiff-{what}-{_machine_tag()}-{os.getpid()}"


def _replace(tmp: Path, path: Path) -> None:
    exists = path.exists() or path.is_symlink()
    if exists and (tmp.is_dir() or (path.is_dir() and not path.is_symlink())):
        # rename() cannot put a folder over an existing file, nor anything over a non-empty folder:
        # move the old output aside, put the new one in place (restoring the old one if that fails).
        old = path.with_name(_staging_base(path, "old"))
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)
            raise
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
