"""`crdiff prune` and `crdiff profiles` end to end: Typer's CliRunner, plus real subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crdiff_cli.pruning.profile_table import get_profile
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.spec import PruneSpec, prune_
from crdiff_cli.storage.atomic import OutputKind
from helpers import invoke, run

UNET_FILES = {"config.json", "diffusion_pytorch_model.safetensors"}
CRDIFF = Path(sys.executable).parent / "crdiff"  # the console script of the environment running the tests


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def library_pruned(load_tiny, name: str, ratios: Ratios):
    """What the library makes of the same request: fresh tiny model, PruneSpec, prune_."""
    model = load_tiny(name)
    spec = PruneSpec.from_unet(model.unet, ratios)
    prune_(model.unet, spec)
    return model, spec


def check_record(out: Path, spec: PruneSpec, **fields):
    record = json.loads((out / "crdiff_prune.json").read_text())
    assert record["format"] == "crdiff-prune/1"
    for group in ("down", "mid", "up"):
        g = record["groups"][group]
        assert set(g) >= {"ratio", "threshold", "targets", "pruned"}
        want = spec.groups[group]
        assert (g["ratio"], g["threshold"], g["targets"], g["pruned"], g["layers"]) == \
            (want.ratio, want.threshold, want.targets, want.pruned, want.layers)
    assert PruneSpec.from_dict(record) == spec
    for key, value in fields.items():
        assert record[key] == value, key
    return record


def check_table(stdout: str, spec: PruneSpec):
    for group, g in spec.groups.items():
        line = next(line for line in stdout.splitlines() if re.search(rf"\b{group}\b", line) and "," in line)
        assert f"{g.targets:,}" in line and f"{g.pruned:,}" in line
        assert (f"{g.threshold:.6g}" if g.threshold is not None else "-") in line


# --- successful runs --------------------------------------------------------------------------------

def test_prune_res_writes_pipeline_folder(tmp_path, load_tiny):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out = tmp_path / "pruned"
    result = invoke("prune", "--model", "tiny", "--res", "400x560", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == ""  # exact profile: no warning

    expected, spec = library_pruned(load_tiny, "tiny", get_profile("sd15@400x560").ratios)
    assert spec.ratios == Ratios(0.319, 0.240, 0.192)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is StableDiffusionPipeline
    assert_same_state(pipe.unet.state_dict(), expected.unet.state_dict())
    assert_same_state(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), expected.unet.state_dict())
    for name in ("vae", "text_encoder"):
        assert_same_state(getattr(pipe, name).state_dict(), getattr(expected.pipe, name).state_dict())
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "crdiff_prune.json"} <= \
        {p.name for p in out.iterdir()}
    check_record(out, spec, family="sd15", model="tiny", resolution="400x560")
    check_table(result.stdout, spec)
    assert "sd15@400x560" in result.stdout and f"wrote {out}" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_prune_unet_only(tmp_path, load_tiny):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "unet"
    result = invoke("prune", "--model", "tiny", "--ratios", "0.3/0.2/0.1", "--unet-only", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == UNET_FILES | {"crdiff_prune.json"}
    expected, spec = library_pruned(load_tiny, "tiny", Ratios(0.3, 0.2, 0.1))
    unet = UNet2DConditionModel.from_pretrained(out)
    assert_same_state(unet.state_dict(), expected.unet.state_dict())
    record = check_record(out, spec, ratios={"down": 0.3, "mid": 0.2, "up": 0.1}, resolution=None)
    assert "--ratios" in record["ratios_origin"]
    check_table(result.stdout, spec)


def test_prune_profile_on_tiny_sdxl(tmp_path, load_tiny):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    out = tmp_path / "xl"
    result = invoke("prune", "--model", "tiny-sdxl", "--profile", "sdxl@400x560", "--out", str(out))
    assert result.exit_code == 0, result.output
    expected, spec = library_pruned(load_tiny, "tiny-sdxl", Ratios(0.482, 0.396, 0.469))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is StableDiffusionXLPipeline
    assert_same_state(pipe.unet.state_dict(), expected.unet.state_dict())
    record = check_record(out, spec, family="sdxl", model="tiny-sdxl")
    assert record["ratios"] == {"down": 0.482, "mid": 0.396, "up": 0.469}
    assert "sdxl@400x560" in record["ratios_origin"]


def test_prune_profile_file(tmp_path, load_tiny):
    profile = get_profile("sd15@768x768").to_dict() | {"name": "mine", "ratios": {"down": 0.11, "mid": 0.22, "up": 0.33}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(profile))
    out = tmp_path / "out"
    result = invoke("prune", "--model", "tiny", "--profile", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    _, spec = library_pruned(load_tiny, "tiny", Ratios(0.11, 0.22, 0.33))
    check_record(out, spec, ratios={"down": 0.11, "mid": 0.22, "up": 0.33})


def test_prune_nearest_profile_warns(tmp_path, load_tiny):
    out = tmp_path / "near"
    result = invoke("prune", "--model", "tiny", "--res", "408x560", "--out", str(out))
    assert result.exit_code == 0, result.output
    warning = result.stderr.strip()
    assert warning.startswith("warning:") and "sd15@400x560" in warning and "408x560" in warning
    assert len(warning.splitlines()) == 1
    _, spec = library_pruned(load_tiny, "tiny", Ratios(0.319, 0.240, 0.192))
    check_record(out, spec, resolution="408x560")


def test_prune_overwrite_replaces_only_what_crdiff_wrote(tmp_path):
    """--overwrite replaces a previous prune output, but never a file a user has put in it since (the rule of
    every command): such a folder is refused whole and the file kept."""
    out = tmp_path / "out"
    assert invoke("prune", "--model", "tiny", "--ratios", "0.1/0.1/0.1", "--out", str(out)).exit_code == 0
    record = json.loads((out / "crdiff_prune.json").read_text())
    assert set(record["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    result = invoke("prune", "--model", "tiny", "--ratios", "0.1/0.1/0.1", "--out", str(out))
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr

    (out / "unet" / "notes.txt").write_text("the user's, not crdiff's")
    result = invoke("prune", "--model", "tiny", "--ratios", "0.2/0.2/0.2", "--out", str(out), "--overwrite")
    assert result.exit_code == 2 and "not a pruned model folder written by crdiff" in result.stderr
    assert (out / "unet" / "notes.txt").read_text() == "the user's, not crdiff's"

    (out / "unet" / "notes.txt").unlink()
    result = invoke("prune", "--model", "tiny", "--ratios", "0.2/0.2/0.2", "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "crdiff_prune.json").read_text())["ratios"]["down"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries or old copies left


def test_prune_overwrite_refuses_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file where the folder should go")
    result = invoke("prune", "--model", "tiny", "--ratios", "0.1/0.1/0.1", "--unet-only", "--out", str(out),
                    "--overwrite")
    assert result.exit_code == 2 and "is not a folder" in result.stderr
    assert out.read_text() == "a file where the folder should go"


ANYTHING = {directory: OutputKind("test output", "nothing", lambda path: True, folder=directory)
            for directory in (True, False)}


@pytest.mark.parametrize("old_kind, directory", [("file", False), ("folder", True), ("missing", True),
                                                 ("missing", False), ("empty-folder", True)])
def test_atomic_path_replaces_an_old_output(tmp_path, old_kind, directory):
    from crdiff_cli.storage.atomic import atomic_path

    target = tmp_path / "out"
    if old_kind == "file":
        target.write_text("old")
    elif old_kind.endswith("folder"):
        target.mkdir()
        if old_kind == "folder":
            (target / "old.txt").write_text("old")
    with atomic_path(target, overwrite=True, kind=ANYTHING[directory], directory=directory) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        if directory:
            (tmp / "new.txt").write_text("new")
        else:
            tmp.write_text("new")
    assert (target / "new.txt" if directory else target).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("old_kind", ["symlink-to-folder", "file-for-a-folder"])
def test_atomic_path_refuses_another_shape(tmp_path, old_kind):
    from crdiff_cli.errors import CrdiffError
    from crdiff_cli.storage.atomic import atomic_path

    target, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours to delete")
    if old_kind == "symlink-to-folder":
        target.symlink_to(elsewhere, target_is_directory=True)
    else:
        target.write_text("old")
    with pytest.raises(CrdiffError, match="choose another --out"):
        with atomic_path(target, overwrite=True, kind=ANYTHING[True], directory=True):
            pass
    assert (elsewhere / "keep.txt").read_text() == "not ours to delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_atomic_path_failure_keeps_old_output(tmp_path):
    from crdiff_cli.storage.atomic import atomic_path

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, overwrite=True, kind=ANYTHING[True], directory=True) as tmp:
            (tmp / "half.txt").write_text("half-written")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- bad input: exit 2, one line on stderr, no traceback, nothing written ------------------------------

BAD = [
    (["--ratios", "0.3/0.2"], "three numbers"),
    (["--ratios", "a/b/c"], "three numbers"),
    (["--ratios", "1.0/0.1/0.1"], "outside [0, 1)"),
    (["--ratios", "0.1/0.1/-0.1"], "outside [0, 1)"),
    (["--res", "401x560"], "not a multiple of 8"),
    (["--res", "400x100000"], "out of range"),
    (["--res", "400by560"], "not HEIGHTxWIDTH"),
    (["--profile", "sd15@123x456"], "unknown profile"),
    (["--ratios", "0.1/0.1/0.1", "--profile", "sd15@512x512"], "--ratios and --profile"),
    (["--ratios", "0.1/0.1/0.1", "--dtype", "fp64"], "unknown dtype"),
    ([], "--ratios missing"),
]


def check_refused(result, words: str, folder: Path, before: set):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and words in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, not a crash
    assert {p.name for p in folder.iterdir()} == before, "something was written"


@pytest.mark.parametrize("args, words", BAD, ids=[" ".join(a) or "no-ratios" for a, _ in BAD])
def test_prune_bad_input(tmp_path, args, words):
    out = tmp_path / "out"
    result = invoke("prune", "--model", "tiny", "--out", str(out), *args)
    check_refused(result, words, tmp_path, set())


@pytest.mark.parametrize("model, words", [
    ("{tmp}/missing-model", "does not exist"),
    ("{tmp}/corrupt", "cannot load the pipeline"),
    ("{tmp}/not-a-pipeline", "model_index.json is missing"),
    ("{tmp}/weights.ckpt", "safetensors"),
    ("crdiff-tests/not-in-the-cache", "not found"),
])
def test_prune_bad_model(tmp_path, tiny_dirs, model, words):
    shutil.copytree(tiny_dirs["tiny"], tmp_path / "corrupt")
    (tmp_path / "corrupt" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 100)
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "weights.ckpt").write_bytes(b"\x80\x04junk")
    before = {p.name for p in tmp_path.iterdir()}
    result = invoke("prune", "--model", model.format(tmp=tmp_path), "--ratios", "0.1/0.1/0.1",
                    "--out", str(tmp_path / "out"))
    check_refused(result, words, tmp_path, before)


def test_prune_makes_missing_parent_folders(tmp_path):
    result = invoke("prune", "--model", "tiny", "--ratios", "0.1/0.1/0.1", "--out", str(tmp_path / "a" / "b"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "b" / "crdiff_prune.json").is_file()


# --- crdiff profiles ----------------------------------------------------------------------------------

PROFILE_ROW = re.compile(r"\b(sd15|sd21|sdxl)@(\d+)x(\d+)\b")


def test_profiles_lists_table6():
    result = invoke("profiles")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if PROFILE_ROW.search(line)]
    assert len(rows) == 13
    assert "HEIGHTxWIDTH" in result.stdout
    row = next(r for r in rows if "sd15@400x560" in r)
    assert all(v in row for v in ("0.319", "0.240", "0.192"))
    assert "*" in next(r for r in rows if "sdxl@1024x1024" in r)


def test_profiles_family_filter():
    result = invoke("profiles", "--family", "sdxl")
    assert result.exit_code == 0
    assert len([line for line in result.stdout.splitlines() if PROFILE_ROW.search(line)]) == 5
    result = invoke("profiles", "--family", "sd3")
    assert result.exit_code == 2 and "no profiles for family" in result.stderr


# --- real processes -------------------------------------------------------------------------------------

def test_console_script_prune(tmp_path, load_tiny):
    """The installed `crdiff` entry point, as a user runs it (env carries HF_HUB_OFFLINE, CRDIFF_CACHE)."""
    assert CRDIFF.exists(), f"console script not installed next to {sys.executable}"
    out = tmp_path / "out"
    proc = run(CRDIFF, "prune", "--model", "tiny", "--res", "400x560", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    expected, spec = library_pruned(load_tiny, "tiny", Ratios(0.319, 0.240, 0.192))
    assert_same_state(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), expected.unet.state_dict())
    check_record(out, spec, family="sd15")
    check_table(proc.stdout, spec)

    # bad input in a real process: library logging and warnings must not add lines to the one-line error
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "out", corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 100)
    for args, words in ((["--model", "tiny", "--res", "400x561"], "multiple of 8"),
                        (["--model", corrupt, "--ratios", "0.1/0.1/0.1"], "cannot load the pipeline")):
        proc = run(CRDIFF, "prune", *args, "--out", tmp_path / "bad")
        assert proc.returncode == 2 and not (tmp_path / "bad").exists(), proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr


HEAVY = ("torch", "diffusers", "transformers")


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from crdiff_cli.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'prune' in r.output; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    for args in (["--help"], ["prune", "--help"], ["profiles"]):
        proc = run(sys.executable, "-X", "importtime", "-m", "crdiff_cli", *args)
        assert proc.returncode == 0, proc.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
        assert not imported & set(HEAVY), (args, imported & set(HEAVY))


@pytest.mark.parametrize("args", [
    ["prune", "--model", "tiny", "--ratios", "0.1/0.1", "--out", "x"],
    ["generate", "--model", "tiny", "--res", "64x64", "--prompt", "p", "--k", "-1", "--out", "x"],
    ["search", "--model", "tiny", "--res", "64x64", "--prompt", "p", "--iters", "0", "--out", "x.json"],
    ["evaluate", "--model", "tiny", "--res", "64x64", "--prompt", "p", "--k", "-1", "--out", "x"],
])
def test_a_bad_flag_is_refused_before_torch_is_imported(tmp_path, args):
    """A typo costs no torch import (1.5 s on a quiet machine, far more under load)."""
    proc = run(sys.executable, "-X", "importtime", "-m", "crdiff_cli", *args, cwd=tmp_path)
    assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), (args, imported & set(HEAVY))


def test_python_m_and_help_texts():
    proc = run(sys.executable, "-m", "crdiff_cli", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("prune", "profiles", "search", "bake", "generate"):
        assert command in proc.stdout
    proc = run(sys.executable, "-m", "crdiff_cli", "prune", "--help", env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    for flag in ("--model", "--ratios", "--profile", "--res", "--out", "--unet-only", "--overwrite"):
        assert flag in proc.stdout
    assert "HEIGHTxWIDTH" in proc.stdout
