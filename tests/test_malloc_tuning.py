"""The CLI's glibc malloc settings: large blocks are reused across calls instead of mapped afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from crdiff_cli import cli, malloc_tuning

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Allocate and touch 64 MiB (above glibc's largest dynamic mmap threshold, like the UNet's conv weight
# reorders), free it, do it again: print the minor page faults of the second round.
SECOND_ROUND_FAULTS = """
import resource, sys, torch
from crdiff_cli.malloc_tuning import reuse_large_blocks
applied = reuse_large_blocks() if sys.argv[1] == "tuned" else False
torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // 4096


def second_round(mode: str, env=None) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, mode], capture_output=True, text=True,
                          check=True, env=env)
    applied, faults = done.stdout.split()
    return applied, int(faults)


@glibc
@pytest.mark.xfail(strict=False, reason="issue 13, open: in a freshly created venv (CI) the second 64 MiB round "
                   "still faults every page although mallopt succeeded; in a venv over the system site-packages "
                   "it faults none. The cause is not found yet, so the fix is not verified where CI runs.")
def test_tuned_process_reuses_a_freed_large_block():
    applied, tuned = second_round("tuned")
    assert applied == "True"
    assert tuned < PAGES // 10  # the freed block is reused: no fresh pages
    _, default = second_round("default")
    assert default > PAGES // 2  # glibc's default maps it afresh: every page faults again


@glibc
def test_user_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=65536")
    assert malloc_tuning.user_configured()
    assert not malloc_tuning.reuse_large_blocks()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not malloc_tuning.reuse_large_blocks()


def test_cli_entry_point_tunes_before_running(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc_tuning, "reuse_large_blocks", lambda: calls.append("tuned"))
    monkeypatch.setattr(sys, "argv", ["crdiff", "--version"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0 and calls == ["tuned"]
