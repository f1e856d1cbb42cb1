"""Prompt files: one prompt per line, as ``--prompts`` and the library read them."""

from __future__ import annotations

from pathlib import Path

from crdiff_cli.errors import CrdiffError


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (UTF-8); blank lines and ``#`` comments are skipped.

    A UTF-8 byte-order mark (Windows editors write one) is dropped, so it cannot hide a first ``#``.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise CrdiffError(f"prompts file {path} does not exist; pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CrdiffError(f"cannot read prompts file {path} as UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CrdiffError(f"prompts file {path} has no prompts; write one prompt per line")
    return prompts
