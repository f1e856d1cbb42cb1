"""Packaging: the wheel ships the profiles and exporters inside the crdiff_cli namespace.

PyPI has an unrelated top-level ``exporters`` package, so the repository's ``exporters/`` and
``profiles/`` folders must install as ``crdiff_cli.exporters`` and ``crdiff_cli.profiles`` (PyPI's unrelated ``exporters`` package must not be shadowed),
and an installed wheel, not only the source tree, must find them.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

from helpers import run

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "out", "*.whl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the project (the source tree gets no build/ or egg-info from us)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    proc = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", tmp / "dist", src)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list((tmp / "dist").glob("crdiff-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    profiles = [n for n in names if n.startswith("crdiff_cli/profiles/") and n.endswith(".json")]
    assert len(profiles) == 13, profiles
    assert "crdiff_cli/profiles/__init__.py" in names
    assert "crdiff_cli/exporters/__init__.py" in names
    assert "crdiff_cli/cli/__init__.py" in names and "crdiff_cli/__main__.py" in names
    top = {n.split("/", 1)[0] for n in names}
    assert not {"exporters", "profiles", "tests", "benchmarks", "docs"} & top, top
    assert {t for t in top if not t.endswith(".dist-info")} == {"crdiff_cli"}
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "crdiff = crdiff_cli.cli:main" in entry_points
    # every module of the source tree is shipped (a subpackage missing from pyproject's package list is not)
    expected = {f"crdiff_cli/{p.relative_to(ROOT / 'crdiff_cli').as_posix()}" for p in (ROOT / "crdiff_cli").rglob("*.py")}
    expected |= {f"crdiff_cli/exporters/{p.relative_to(ROOT / 'exporters').as_posix()}" for p in (ROOT / "exporters").rglob("*.py")}
    expected |= {f"crdiff_cli/profiles/{p.name}" for p in (ROOT / "profiles").iterdir() if p.suffix in (".py", ".json")}
    assert not expected - set(names), sorted(expected - set(names))
    for name in profiles:
        data = json.loads(zipfile.ZipFile(wheel).read(name))
        assert data["format"] == "crdiff-profile/1" and name.endswith(f"/{data['name']}.json")


# An editable install of the source tree (as in development) adds a meta-path finder that would quietly
# supply anything missing from the wheel: drop it in the subprocesses, so only the wheel is importable.
ISOLATE = ("import sys\n"
           "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n")


@pytest.mark.slow
def test_installed_wheel_finds_profiles_and_exporters(wheel, tmp_path):
    """Install the wheel alone into a folder and import from there, away from the source tree."""
    target = tmp_path / "site"
    proc = run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", target, wheel)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ISOLATE + (
        "import importlib, importlib.util, crdiff_cli, crdiff_cli.exporters\n"
        "from importlib.resources import files\n"
        "from crdiff_cli.pruning.profile_table import builtin_profiles, get_profile\n"
        f"assert crdiff_cli.__file__.startswith({str(target)!r}), crdiff_cli.__file__\n"
        f"assert crdiff_cli.exporters.__file__.startswith({str(target)!r}), crdiff_cli.exporters.__file__\n"
        "jsons = [p.name for p in files('crdiff_cli.profiles').iterdir() if p.name.endswith('.json')]\n"
        "assert len(jsons) == 13, jsons\n"
        "assert len(builtin_profiles()) == 13\n"
        "assert str(get_profile('sdxl@400x560').ratios) == '0.482/0.396/0.469'\n"
        "assert importlib.util.find_spec('profiles') is None or 'site' not in str(importlib.util.find_spec('profiles').origin)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "120"}
    proc = run(sys.executable, "-c", code, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert not (target / "exporters").exists() and not (target / "profiles").exists()

    def cli(*args):
        main = ISOLATE + f"import runpy; sys.argv = ['crdiff', *{list(args)!r}]; runpy.run_module('crdiff_cli', run_name='__main__')"
        return run(sys.executable, "-c", main, env=env, cwd=tmp_path)

    proc = cli("profiles")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum("@" in line for line in proc.stdout.splitlines()) == 13
    proc = cli("--help")  # imports every command module
    assert proc.returncode == 0 and "prune" in proc.stdout, proc.stderr[-3000:]


def test_current_install_resources():
    folder = files("crdiff_cli.profiles")
    jsons = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
    assert len(jsons) == 13 and "sd15@400x560.json" in jsons
    assert json.loads(folder.joinpath("sd15@512x512.json").read_text())["native_resolution"] is True
    exporters = importlib.import_module("crdiff_cli.exporters")
    assert Path(exporters.__file__).parent.name == "exporters"


@pytest.mark.slow
def test_wheel_runs_a_pipeline_folder_in_a_venv_without_torch(wheel, tmp_path, tiny_dirs):
    """requirements-runtime.txt plus the wheel without its dependencies, in a new venv: torch cannot be imported,
    and `crdiff generate --pipeline` makes the image the runner makes here."""
    import numpy as np
    from PIL import Image

    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
    from helpers import invoke, ok

    folder = tmp_path / "folder"
    ok(invoke("bake", "--model", "tiny-sdxl", "--res", "64x64", "--format", "onnx-pipeline", "--out", folder,
              "--no-verify"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["-r", ROOT / "requirements-runtime.txt"], ["--no-deps", wheel]):
        installed = run(*pip, *args)
        assert installed.returncode == 0, installed.stderr
    assert run(venv / "bin" / "python", "-c", "import torch").returncode != 0
    result = run(venv / "bin" / "crdiff", "generate", "--pipeline", folder, "--prompt", "a fox", "--seed", "8",
                 "--steps", "2", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    expected = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")("a fox", seeds=8, steps=2)[0]
    with Image.open(tmp_path / "out" / "0_8.png") as image:
        assert np.array_equal(np.asarray(expected), np.asarray(image))
