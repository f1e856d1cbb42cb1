"""Write-then-rename helpers, so an interrupted or failed command never leaves a half-written output."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from crdiff_cli.errors import CrdiffError


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; refuse a missing parent folder."""
    if path.exists() and not overwrite:
        raise CrdiffError(f"output {path} already exists; choose another --out or pass --overwrite")
    if not path.parent.exists():
        raise CrdiffError(f"the folder {path.parent} for output {path.name} does not exist; create it first")


@contextmanager
def atomic_path(path: Path, overwrite: bool = False, *, directory: bool = False):
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    check_output(path, overwrite)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: Path, path: Path) -> None:
    exists = path.exists() or path.is_symlink()
    if exists and (tmp.is_dir() or (path.is_dir() and not path.is_symlink())):
        # rename() cannot put a folder over an existing file, nor anything over a non-empty folder:
        # move the old output aside, put the new one in place (restoring the old one if that fails).
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
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
