"""`crdiff generate` end to end (CliRunner, real tiny pipelines) and the write-safety of crdiff_cli.pipelines.generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from crdiff_cli.cli import app
from crdiff_cli.dual.apply import apply_crdiff
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pipelines.images import save_png
from crdiff_cli.pipelines.loading import load_model
from crdiff_cli.pipelines.prompts import read_prompts
from crdiff_cli.pipelines.schedulers import denoising_calls, set_scheduler
from crdiff_cli.pipelines.to_folder import generate_to_folder
from crdiff_cli.pruning.profile_table import nearest_profile
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec

RES = Resolution(64, 48)  # HEIGHTxWIDTH: PIL reports (48, 64)
COMMON = ["--res", str(RES), "--steps", "2", "--negative-prompt", "blurry"]


def generate(out: Path, *args: str):
    return CliRunner().invoke(app, ["generate", "--out", str(out), *args])


def ok(result):
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def files(folder: Path) -> list[str]:
    """Every entry of ``folder``, dot-files (temporaries) included."""
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name, scheduler", [("tiny", None), ("tiny-sdxl", "ddim")])
def test_generate_end_to_end(tmp_path, tiny_dirs, name, scheduler):
    out = tmp_path / "out"
    extra = ["--scheduler", scheduler] if scheduler else []
    result = ok(generate(out, "--model", name, "--prompt", "a red fox", "--seed", "5", "-n", "2", *COMMON, *extra))
    assert files(out) == ["0_5.png", "0_6.png", "manifest.json"]  # no temporaries left behind
    assert "wrote 2 images" in result.stdout and "k=1.5" in result.stdout
    family = load_model(name).family
    profile, exact = nearest_profile(family, RES)
    assert not exact and f"using the nearest one, {profile.name}" in result.stderr

    png = Image.open(out / "0_5.png")
    assert png.size == (RES.width, RES.height)
    meta = json.loads(png.text["crdiff"])
    assert {k: meta[k] for k in ("prompt", "negative_prompt", "seed", "steps", "height", "width", "k", "mode",
                                 "model", "family", "ratios", "scheduler")} == {
        "prompt": "a red fox", "negative_prompt": "blurry", "seed": 5, "steps": 2, "height": 64, "width": 48,
        "k": 1.5, "mode": "crdiff", "model": name, "family": family, "ratios": str(profile.ratios),
        "scheduler": scheduler or "model default"}
    assert all(meta["thresholds"][g] is not None for g in ("down", "mid", "up"))
    assert png.text["parameters"].startswith("a red fox\nNegative prompt: blurry\n")
    assert "k: 1.5" in png.text["parameters"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert [(i["file"], i["seed"], i["variant"]) for i in manifest["images"]] == [
        ("0_5.png", 5, "crdiff"), ("0_6.png", 6, "crdiff")]
    assert manifest["images"][0]["params"] == meta and manifest["run"]["seeds"] == [5, 6]

    # The CLI image is the library's: same ratios, k, seed, steps, negative prompt, scheduler.
    loaded = load_model(name)
    apply_crdiff(loaded.pipe, PruneSpec.from_unet(loaded.unet, profile.ratios), k=1.5)
    set_scheduler(loaded.pipe, scheduler)
    settings = GenerationSettings(RES, steps=2, negative_prompt="blurry", scheduler=scheduler)
    assert np.array_equal(pixels(out / "0_5.png"), np.asarray(generate_image(loaded.pipe, "a red fox", 5, settings)))


def find_panel(grid: np.ndarray, panel: np.ndarray, left: int) -> bool:
    """Whether ``panel`` appears in ``grid`` at column ``left`` at some height (labels may sit above)."""
    h, w = panel.shape[:2]
    return any(np.array_equal(grid[y:y + h, left:left + w], panel) for y in range(grid.shape[0] - h + 1))


def test_compare_prompts_file_and_dense(tmp_path, tiny_dirs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\n\n  a red fox  \n   # indented comment\nune forêt enneigée\n\n", encoding="utf-8")
    out = tmp_path / "cmp"
    ok(generate(out, "--model", "tiny", "--prompts", str(prompts), "--seed", "3", "--compare",
                "--ratios", "0.3/0.2/0.4", *COMMON))
    assert files(out) == ["0_3.png", "0_3_dense.png", "1_3.png", "1_3_dense.png", "compare_0.png",
                          "compare_1.png", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    fox, forest = "a red fox", "une forêt enneigée"
    assert [(i["prompt"], i["variant"]) for i in manifest["images"]] == [
        (fox, "crdiff"), (fox, "dense"), (forest, "crdiff"), (forest, "dense")]
    assert json.loads(Image.open(out / "1_3.png").text["crdiff"])["prompt"] == forest

    # --dense gives the comparison's dense image bit for bit; CR-Diff differs from it.
    dense_out = tmp_path / "dense"
    ok(generate(dense_out, "--model", "tiny", "--prompt", "a red fox", "--seed", "3", "--dense", *COMMON))
    assert files(dense_out) == ["0_3.png", "manifest.json"]
    assert json.loads(Image.open(dense_out / "0_3.png").text["crdiff"])["mode"] == "dense"
    dense, crdiff = pixels(out / "0_3_dense.png"), pixels(out / "0_3.png")
    assert np.array_equal(pixels(dense_out / "0_3.png"), dense)
    assert not np.array_equal(dense, crdiff)

    # The grid holds dense, CR-Diff and their amplified difference (enlarged by a whole factor, said in the title).
    grid = np.asarray(Image.open(out / "compare_0.png").convert("RGB"))
    third = grid.shape[1] // 3
    scale = third // RES.width
    enlarge = lambda a: a.repeat(scale, axis=0).repeat(scale, axis=1)  # noqa: E731 (PIL NEAREST, integer scale)
    assert find_panel(grid, enlarge(dense), 0) and find_panel(grid, enlarge(crdiff), third)
    diff = np.abs(crdiff.astype(np.int16) - dense.astype(np.int16))
    gain = max(1, min(64, 255 // max(1, int(diff.max()))))
    assert find_panel(grid, enlarge(np.minimum(diff * gain, 255).astype(np.uint8)), 2 * third)


def test_same_seed_same_pixels(tmp_path, tiny_dirs):
    args = ["--model", "tiny-sdxl", "--prompt", "a red fox", "--seed", "11", "--k", "1.2", *COMMON]
    ok(generate(tmp_path / "a", *args))
    ok(generate(tmp_path / "b", *args))
    ok(generate(tmp_path / "c", *args[:-len(COMMON)], "--seed", "12", *COMMON))
    assert np.array_equal(pixels(tmp_path / "a" / "0_11.png"), pixels(tmp_path / "b" / "0_11.png"))
    assert not np.array_equal(pixels(tmp_path / "a" / "0_11.png"), pixels(tmp_path / "c" / "0_12.png"))


def test_help_states_default_k_and_resolution_order():
    result = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "default 1.5" in text and "HEIGHTxWIDTH" in text


def test_large_k_only_warns(tmp_path, tiny_dirs):
    result = ok(generate(tmp_path / "o", "--model", "tiny", "--prompt", "x", "--k", "4", "--ratios", "0.3/0.2/0.4",
                         "--res", "64x48", "--steps", "1"))
    assert "k = 4 is far above" in result.stderr
    assert files(tmp_path / "o") == ["0_0.png", "manifest.json"]


BAD = {
    "k nan": (["--k", "nan"], "finite"),
    "k inf": (["--k", "inf"], "finite"),
    "k negative": (["--k", "-1"], ">= 0"),
    "unknown scheduler": (["--scheduler", "dpm-9000"], "--scheduler 'dpm-9000' is unknown"),
    "res not multiple of 8": (["--res", "65x48"], "multiple of 8"),
    "unknown mask mode": (["--masks", "lazy"], "mask mode"),
    "unknown profile": (["--profile", "sd15@1x1"], "unknown profile"),
    "dense and compare": (["--dense", "--compare"], "--compare"),
    "no images": (["--num-images", "0"], "--num-images"),
    "no steps": (["--steps", "0"], "--steps"),
    "poa window reversed": (["--poa-interval", "0.5:0.2"], "--poa-interval 0.5:0.2 has START > STOP"),
    "poa window beyond 1": (["--poa-interval", "0:1.5"], "--poa-interval 0:1.5 must be START:STOP"),
    "poa window not a range": (["--poa-interval", "0.3"], "--poa-interval '0.3' is not START:STOP"),
    "poa outside unknown": (["--poa-outside", "both"], "--poa-outside 'both' is not a pass"),
    "poa refresh 0": (["--poa-refresh", "0"], "--poa-refresh 0 must be a whole number >= 1"),
    "dense with a poa policy": (["--dense", "--poa-refresh", "2"], "--dense has none"),
}


@pytest.mark.parametrize("case", [*BAD, "missing prompts file", "empty prompts file", "latin-1 prompts file",
                                  "both prompt options", "no prompt option"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    prompts = tmp_path / "prompts.txt"
    prompt_args = {"missing prompts file": ["--prompts", str(tmp_path / "nope.txt")],
                   "empty prompts file": ["--prompts", str(prompts)],
                   "latin-1 prompts file": ["--prompts", str(prompts)],
                   "both prompt options": ["--prompt", "x", "--prompts", str(prompts)],
                   "no prompt option": []}.get(case, ["--prompt", "x"])
    prompts.write_bytes("une forêt\n".encode("latin-1") if case == "latin-1 prompts file" else b"# nothing\n\n")
    args, message = BAD.get(case, ([], "prompt"))
    out = tmp_path / "out"
    result = generate(out, "--model", "tiny", "--res", "64x48", *prompt_args, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert not out.exists()


def test_read_prompts_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# a BOM first\r\na cat\r\n\r\n  # not a prompt\r\nun chien 🐕\r\n#x".encode("utf-8"))
    assert read_prompts(path) == ["a cat", "un chien 🐕"]


# --- write safety ----------------------------------------------------------------------------------

def test_interrupted_run_leaves_only_whole_images(tmp_path, tiny_dirs):
    """Stop generation in the middle of the second image: the first is whole, nothing else exists."""
    loaded = load_model("tiny")
    settings = GenerationSettings(RES, steps=3)
    first_step_of_second_image = denoising_calls(loaded.pipe, settings.steps) + 1
    steps_seen = []

    def interrupt_during_second_image():
        steps_seen.append(1)
        if len(steps_seen) == first_step_of_second_image:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_to_folder(loaded.pipe, ["a red fox"], [0, 1], settings, tmp_path, model_info={"model": "tiny"},
            on_step=interrupt_during_second_image)
    assert files(tmp_path) == ["0_0.png"]
    with Image.open(tmp_path / "0_0.png") as png:
        png.load()
        assert png.size == (RES.width, RES.height) and "crdiff" in png.text


def test_failed_png_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (8, 8)), tmp_path / "x.png", {"prompt": "p"})  # PNG has no CMYK mode
    assert files(tmp_path) == []
