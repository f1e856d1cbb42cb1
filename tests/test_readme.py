"""The README's quick start, run as a newcomer runs it: its commands are read from README.md itself (never
copied here), so a README whose first commands fail cannot pass CI.

The install steps of the quick start (venv, pip) are what CI itself runs; every other command of the section
(``crdiff ...``, ``printf ...``) runs here, in order, in an empty folder, through a shell, with the installed
``crdiff`` script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS_HERE = ("crdiff ", "printf ")  # what the test runs; the rest of a line (venv, pip install) is set-up


def quick_start_commands() -> list[str]:
    """The commands of README.md's quick start section, in order (``a && b`` lines split)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            commands += [part.strip() for part in line.split(" && ") if part.strip().startswith(RUNS_HERE)]
    return commands


def test_the_quick_start_is_found():
    commands = quick_start_commands()
    assert any(c.startswith("crdiff generate") for c in commands)
    assert any(c.startswith("crdiff evaluate") for c in commands)


@pytest.mark.slow
def test_quick_start_commands_run_in_an_empty_folder(tmp_path, tiny_dirs):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in quick_start_commands():
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, command
    # what the README says the commands write
    for name in ("out/demo/0_0.png", "out/demo/0_0_dense.png", "out/demo/compare_0.png", "out/demo/manifest.json",
                 "out/eval/report.html", "out/eval/results.csv", "out/eval/paired.csv", "out/eval/scores.jsonl"):
        assert (tmp_path / name).is_file(), name
