"""Helpers the test modules share (imported as ``helpers``: pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import errno
import subprocess

from typer.testing import CliRunner

from crdiff_cli.cli import app


def invoke(*args):
    """Run ``crdiff ARGS...`` in-process (Typer's CliRunner); paths and numbers may be passed as they are."""
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    """``result`` of a command that must succeed, with its output and exception in the failure message."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    """Run a process to completion, its output captured as text (10 minutes at most)."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)


def disk_full_on_second_write(monkeypatch, module) -> None:
    """Make ``module.write_file`` fail as a full disk does (ENOSPC) on its second call, the first written."""
    real, calls = module.write_file, []

    def write_file(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(module, "write_file", write_file)

