"""The CLI's glibc malloc settings: large blocks are reused across calls instead of mapped afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from crdiff_cli import cli
from crdiff_cli.runtime import malloc_tuning

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# What every UNet call does on CPU: a 3x3 convolution of SD1.5's 1280-channel blocks, whose weight oneDNN
# reorders into a 56 MiB temporary (above glibc's largest dynamic mmap threshold) on every call. Print the
# minor page faults of each of six calls.
CONV_FAULTS = """
import resource, sys, torch
from crdiff_cli.runtime.malloc_tuning import reuse_large_blocks
applied = reuse_large_blocks() if sys.argv[1] == "tuned" else False
torch.set_num_threads(1)
weight, x = torch.randn(1280, 1280, 3, 3), torch.randn(2, 1280, 8, 8)
faults = []
with torch.inference_mode():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.nn.functional.conv2d(x, weight, padding=1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""
REORDER_PAGES = 1280 * 1280 * 9 * 4 // 4096


def conv_faults(mode: str) -> tuple[str, list[int]]:
    done = subprocess.run([sys.executable, "-c", CONV_FAULTS, mode], capture_output=True, text=True, check=True)
    applied, *faults = done.stdout.split()
    return applied, [int(f) for f in faults]


@glibc
def test_tuned_process_reuses_the_convolution_temporaries():
    applied, tuned = conv_faults("tuned")
    assert applied == "True"
    assert max(tuned[2:]) < REORDER_PAGES // 10  # after the heap has grown to the working set: no fresh pages
    _, default = conv_faults("default")
    assert min(default[2:]) > REORDER_PAGES // 2  # glibc's default maps the reorder afresh: its pages fault again


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
