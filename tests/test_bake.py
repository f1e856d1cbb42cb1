"""`crdiff bake` and `crdiff generate --artifact` end to end (CliRunner and a real Ctrl-C), on the tiny models.

Images from a .safetensors artifact must equal the live path's bit for bit; images from an .onnx artifact
(ONNX Runtime, CPU provider) may differ from them by at most 2 levels of 255 per channel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from crdiff_cli.cli import app

RATIOS = "0.3/0.2/0.25"
BAKE = ["--res", "64x48", "--ratios", RATIOS, "--k", "1.3"]
GEN = ["--prompt", "a red fox", "--steps", "2", "--seed", "3"]
NAMES = ("tiny", "tiny-sdxl")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def fails(result, message: str, code: int = 2):
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    return result


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_dirs):
    """``{(name, suffix): path}``: both tiny models baked by the CLI in both formats, verified."""
    folder = tmp_path_factory.mktemp("baked")
    paths = {}
    for name in NAMES:
        for suffix in (".safetensors", ".onnx"):
            path = folder / f"{name}{suffix}"
            result = ok(cli("bake", "--model", name, *BAKE, "--out", path))
            assert "verified: max relative error" in result.stdout and path.is_file()
            assert str(path) in result.stdout and "0.3" in result.stdout
            paths[(name, suffix)] = path
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths.values())  # nothing else
    return paths


@pytest.fixture(scope="module")
def live_images(tmp_path_factory, tiny_dirs):
    """The live path's image for each tiny model, with the baked ratios, k and resolution."""
    out = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(f"live-{name}")
        ok(cli("generate", "--model", name, *BAKE, *GEN, "--out", folder))
        out[name] = folder / "0_3.png"
    return out


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_artifact_images_equal_the_live_path_bit_for_bit(tmp_path, baked, live_images, name):
    result = ok(cli("generate", "--model", name, "--artifact", baked[(name, ".safetensors")], *GEN, "--out", tmp_path))
    assert "k=1.3, ratios 0.3/0.2/0.25" in result.stdout and "64x48 HxW" in result.stdout  # the artifact's defaults
    assert np.array_equal(pixels(tmp_path / "0_3.png"), pixels(live_images[name]))
    record = json.loads((tmp_path / "manifest.json").read_text())["images"][0]
    assert record["variant"] == "crdiff" and record["params"]["artifact_format"] == "safetensors"


@pytest.mark.parametrize("name", NAMES)
def test_onnx_artifact_images_match_the_live_path_within_two_levels(tmp_path, baked, live_images, name):
    result = ok(cli("generate", "--model", name, "--artifact", baked[(name, ".onnx")], *GEN, "--out", tmp_path,
                    "--provider", "cpu"))
    assert "on CPUExecutionProvider" in result.stdout
    image, live = pixels(tmp_path / "0_3.png"), pixels(live_images[name])
    assert image.shape == live.shape == (64, 48, 3)
    assert np.abs(image - live).max() <= 2
    params = json.loads((tmp_path / "manifest.json").read_text())["images"][0]["params"]
    assert params["mode"] == "crdiff" and params["k"] == 1.3 and params["ort_fold_masks"] is True


def test_onnx_without_mask_folding_gives_the_same_image(tmp_path, baked, live_images):
    ok(cli("generate", "--model", "tiny", "--artifact", baked[("tiny", ".onnx")], *GEN, "--out", tmp_path,
           "--no-ort-fold-masks"))
    assert np.abs(pixels(tmp_path / "0_3.png") - pixels(live_images["tiny"])).max() <= 2


def test_safetensors_artifact_keeps_k_and_ratios_changeable(tmp_path, baked):
    live, art = tmp_path / "live", tmp_path / "art"
    ok(cli("generate", "--model", "tiny", "--res", "64x48", "--ratios", "0.1/0.1/0.1", "--k", "2", *GEN, "--out", live))
    ok(cli("generate", "--model", "tiny", "--artifact", baked[("tiny", ".safetensors")], "--ratios", "0.1/0.1/0.1",
           "--k", "2", *GEN, "--out", art))
    assert np.array_equal(pixels(live / "0_3.png"), pixels(art / "0_3.png"))


@pytest.mark.parametrize("args, message", [
    (["--out", "{d}/a.bin"], "must end in .safetensors or .onnx"),
    (["--out", "{d}/a.onnx", "--format", "safetensors"], "ends in .onnx but --format is safetensors"),
    (["--out", "{d}/a.onnx", "--format", "tflite"], "unknown --format 'tflite'"),
    (["--out", "{d}/a.onnx", "--opset", "30"], "--opset 30 is outside 14..20"),
    (["--out", "{d}/a.onnx", "--dtype", "bf16"], "artifacts are baked as fp32 or fp16"),
    (["--out", "{d}/a.onnx", "--k", "-1"], "--k -1.0 must be a finite number >= 0"),
    (["--out", "{d}/a.onnx", "--res", "64x50"], "not a multiple of 8"),
])
def test_bad_bake_flags_exit_2_before_loading(tmp_path, args, message):
    args = [a.format(d=tmp_path) for a in args]
    base = ["bake", "--model", "no-such/model", "--res", "64x48", "--ratios", RATIOS]
    fails(cli(*base, *args), message)
    assert list(tmp_path.iterdir()) == []


def test_bake_refuses_an_existing_artifact(baked):
    path = baked[("tiny", ".onnx")]
    fails(cli("bake", "--model", "tiny", *BAKE, "--out", path), "already exists")


@pytest.mark.parametrize("suffix, args, message", [
    (".onnx", ["--k", "2"], "k = 1.3 is folded into the ONNX artifact"),
    (".onnx", ["--ratios", "0.1/0.1/0.1"], "thresholds are for ratios 0.3/0.2/0.25"),
    (".onnx", ["--compare"], "--compare needs the dense model"),
    (".onnx", ["--provider", "npu"], "unknown --provider 'npu'"),
    (".onnx", ["--provider", "cuda"], "CUDAExecutionProvider is not available here"),
    (".safetensors", ["--dense"], "--dense runs the base model as it is"),
    (".safetensors", ["--provider", "cpu"], "apply to .onnx artifacts"),
    (".safetensors", ["--dtype", "fp16"], "the artifact's weights are float32"),
])
def test_artifact_options_it_cannot_honour_exit_2(tmp_path, baked, suffix, args, message):
    fails(cli("generate", "--model", "tiny", "--artifact", baked[("tiny", suffix)], *GEN, *args, "--out", tmp_path),
          message)


def test_generate_without_artifact_needs_res_and_no_onnx_flags(tmp_path):
    fails(cli("generate", "--model", "tiny", *GEN, "--out", tmp_path), "--res HxW is required")
    fails(cli("generate", "--model", "tiny", "--res", "64x48", "--no-ort-fold-masks", *GEN, "--out", tmp_path),
          "pass --artifact PATH")


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_artifact_of_another_base_is_refused(tmp_path, baked, suffix):
    fails(cli("generate", "--model", "tiny", "--artifact", baked[("tiny-sdxl", suffix)], *GEN, "--out", tmp_path),
          "--model tiny has another UNet config than the artifact")


@pytest.mark.parametrize("kind", ["plain UNet", "truncated", "missing"])
def test_foreign_truncated_or_missing_artifacts_exit_2_with_one_line(tmp_path, tiny_dirs, baked, kind):
    if kind == "plain UNet":
        path, message = tiny_dirs["tiny"] / "unet" / "diffusion_pytorch_model.safetensors", "is not a crdiff artifact"
    elif kind == "truncated":
        path, message = tmp_path / "cut.onnx", "is not a readable ONNX model"
        path.write_bytes(baked[("tiny", ".onnx")].read_bytes()[:100_000])
    else:
        path, message = tmp_path / "none.safetensors", "does not exist"
    fails(cli("generate", "--model", "tiny", "--artifact", path, *GEN, "--out", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_bake_leaves_nothing(tmp_path, crdiff_cache):
    """A real SIGINT to a real `crdiff bake` process while it exports: exit 130, the folder stays empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    env = {**os.environ, "CRDIFF_CACHE": str(crdiff_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "crdiff_cli", "bake", "--model", "tiny-sdxl", *BAKE,
                             "--out", str(folder / "a.onnx")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(folder.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "bake finished before it could be interrupted"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted; every output is written whole or not at all" in stderr
    assert list(folder.iterdir()) == []
