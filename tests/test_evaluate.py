"""`crdiff evaluate` end to end on the tiny models: images identical to `crdiff generate`, batching,
resume after SIGKILL, results files, bad input (exit 2 before any model loads)."""

from __future__ import annotations

import csv
import json
import os
import random
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
from crdiff_cli.evaluation.protocol import WorkItem, batches, model_calls, read_prompt_source, work_items
from crdiff_cli.pruning.resolution import Resolution
from helpers import disk_full_on_second_write, ok

PROMPTS = ["a red fox", "a blue boat on a lake", "a green apple", "a yellow bird"]
COMMON = ["--steps", "2", "--metrics", "tiny"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args])


def prompts_file(tmp_path: Path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def test_work_items_are_ordered_and_batches_fixed():
    res = [Resolution(32, 32), Resolution(64, 48)]
    items = work_items(res, ["dense", "crdiff"], 3, [5, 6])
    assert len(items) == 2 * 2 * 3 * 2
    assert items[0] == WorkItem(res[0], "dense", 0, 5) and items[1] == WorkItem(res[0], "dense", 0, 6)
    assert items[6] == WorkItem(res[0], "crdiff", 0, 5) and items[12].resolution == res[1]
    chunks = batches(items, 4)
    # 6 items per (resolution, variant): 4 + 2, never mixing variants or resolutions
    assert [len(b) for b in chunks] == [4, 2] * 4
    assert all(len({(i.resolution, i.variant) for i in b}) == 1 for b in chunks)
    assert items[0].image == "images/32x32/dense/0_5.png"


def test_poa_policy_variants_equal_generate_and_are_compared_with_full_crdiff(tmp_path, tiny_dirs):
    flags = ["--model", "tiny", "--res", "48x40", "--prompts", str(prompts_file(tmp_path, PROMPTS[:1])), "--seed", "2",
             "--steps", "2", "--ratios", "0.3/0.2/0.25", "--scheduler", "ddim"]
    ok(invoke(*flags, "--out", str(tmp_path / "ev"), "--metrics", "tiny",
              "--variants", "crdiff/refresh2,dense,crdiff@0:0.5,crdiff,crdiff@0.5:0.5"))
    ev = tmp_path / "ev" / "images" / "48x40"
    for folder, extra in (("crdiff@0-0.5", ["--poa-interval", "0:0.5"]), ("crdiff_refresh2", ["--poa-refresh", "2"])):
        ok(CliRunner().invoke(app, ["generate", *flags, *extra, "--out", str(tmp_path / folder)]))
        assert (tmp_path / folder / "0_2.png").read_bytes() == (ev / folder / "0_2.png").read_bytes(), folder
    empty_window, dense = (np.asarray(Image.open(ev / f / "0_2.png")) for f in ("crdiff@0.5-0.5", "dense"))
    assert np.array_equal(empty_window, dense)
    rows = read_csv(tmp_path / "ev" / "results.csv")
    assert [(r["variant"], r["passes_per_step"]) for r in rows] == [  # counted UNet calls per step (DDIM: 2 steps)
        ("dense", "1.0"), ("crdiff", "2.0"), ("crdiff/refresh2", "1.5"), ("crdiff@0:0.5", "1.5"),
        ("crdiff@0.5:0.5", "1.0")]
    paired = read_csv(tmp_path / "ev" / "paired.csv")
    assert [(p["a"], p["b"]) for p in paired] == [("crdiff", "dense")] + [
        (v, b) for v in ("crdiff/refresh2", "crdiff@0:0.5", "crdiff@0.5:0.5") for b in ("crdiff", "dense")]
    assert "crdiff@0:0.5 (1.50 passes/step)" in (tmp_path / "ev" / "report.html").read_text()


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_images_are_bit_identical_to_generate(tmp_path, tiny_dirs, name):
    flags = ["--model", name, "--res", "64x48", "--prompts", str(prompts_file(tmp_path, PROMPTS[:2])),
             "--seed", "3", "-n", "2", "--steps", "2", "--negative-prompt", "blurry", "--ratios", "0.3/0.2/0.25"]
    ok(invoke(*flags, "--out", str(tmp_path / "ev"), "--k", "1.3", "--metrics", "tiny"))
    for variant, extra in (("dense", ["--dense"]), ("pruned", ["--k", "1"]), ("crdiff", ["--k", "1.3"])):
        out = tmp_path / variant
        ok(CliRunner().invoke(app, ["generate", *flags, *extra, "--out", str(out)]))
        for index in range(2):
            for seed in (3, 4):
                generated = (out / f"{index}_{seed}.png").read_bytes()
                evaluated = (tmp_path / "ev" / "images" / "64x48" / variant / f"{index}_{seed}.png").read_bytes()
                assert generated == evaluated, (variant, index, seed)  # pixels and PNG text, byte for byte
    ev = tmp_path / "ev" / "images" / "64x48"
    assert not np.array_equal(np.asarray(Image.open(ev / "dense/0_3.png")), np.asarray(Image.open(ev / "crdiff/0_3.png")))


def test_img2img_images_are_bit_identical_to_generate(tmp_path, tiny_dirs):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(init)
    flags = ["--model", "tiny", "--res", "48x64", "--prompt", "a red fox", "--seed", "2", "--steps", "2",
             "--init-image", str(init), "--strength", "0.6", "--ratios", "0.3/0.2/0.25", "--k", "1.3"]
    ok(invoke(*flags, "--out", str(tmp_path / "ev"), "--metrics", "tiny", "--variants", "crdiff"))
    ok(CliRunner().invoke(app, ["generate", *flags, "--out", str(tmp_path / "gen")]))
    assert (tmp_path / "gen" / "0_2.png").read_bytes() == (tmp_path / "ev/images/48x64/crdiff/0_2.png").read_bytes()
    identity = json.loads((tmp_path / "ev" / "scores.jsonl").read_text().splitlines()[0])["identity"]
    assert identity["init_image"] == str(init) and identity["strength"] == 0.6


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_crdiff_did_not_write_is_never_written_into(tmp_path, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke("--model", "tiny", "--res", "32x32", "--prompt", "x", *COMMON, *overwrite, "--out", str(out))
    assert result.exit_code == 2 and "not a crdiff evaluation folder" in result.stderr, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_files_and_table(tmp_path, tiny_dirs):
    out = tmp_path / "ev"
    result = ok(invoke("--model", "tiny", "--res", "32x32", "--res", "48x32", "--prompts",
                       str(prompts_file(tmp_path)), "--limit", "3", "-n", "2", *COMMON, "--out", str(out)))
    assert "resolution" in result.stdout and "48x32" in result.stdout and "crdiff" in result.stdout
    lines = (out / "scores.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    assert len(records) == 2 * 3 * 3 * 2  # resolutions x variants x prompts x seeds, one metric
    assert {r["image"] for r in records} == {f"images/{res}/{v}/{i}_{s}.png" for res in ("32x32", "48x32")
                                             for v in ("dense", "pruned", "crdiff") for i in range(3) for s in (0, 1)}
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == ["resolution", "variant", "k", "ratios", "metric", "n", "mean", "std", "ci_low", "ci_high",
                             "passes_per_step"]
    assert len(rows) == 2 * 3
    # the tiny model's default scheduler (PNDM) makes one more UNet step than asked: 3 calls for --steps 2
    assert {(r["variant"], r["passes_per_step"]) for r in rows} == {("dense", "1.5"), ("pruned", "1.5"), ("crdiff", "3.0")}
    timings = read_csv(out / "timings.csv")
    assert {(t["resolution"], t["variant"], t["images"]) for t in timings} == {
        (res, v, "6") for res in ("32x32", "48x32") for v in ("dense", "pruned", "crdiff")}
    assert all(float(t["seconds_per_image"]) > 0 for t in timings)
    assert {t["vs_dense"] for t in timings if t["variant"] == "dense"} == {"1.0"}
    for row in rows:
        scores = [r["score"] for r in records if (r["resolution"], r["variant"]) == (row["resolution"], row["variant"])]
        assert int(row["n"]) == 6 and float(row["mean"]) == pytest.approx(np.mean(scores))
        assert float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"])
    assert {(r["variant"], r["k"]) for r in rows} == {("dense", "0.0"), ("pruned", "1.0"), ("crdiff", "1.5")}
    paired = read_csv(out / "paired.csv")
    assert [(p["resolution"], p["a"], p["b"]) for p in paired] == [
        ("32x32", "crdiff", "pruned"), ("32x32", "crdiff", "dense"), ("48x32", "crdiff", "pruned"),
        ("48x32", "crdiff", "dense")]
    for p in paired:
        by = {(r["variant"], r["prompt_index"], r["seed"]): r["score"] for r in records
              if r["resolution"] == p["resolution"]}
        diffs = [by[(p["a"], i, s)] - by[(p["b"], i, s)] for i in range(3) for s in (0, 1)]
        assert float(p["mean_diff"]) == pytest.approx(np.mean(diffs))
        assert float(p["win_rate"]) == pytest.approx(np.mean([d > 0 for d in diffs]) + 0.5 * np.mean([d == 0 for d in diffs]))
        assert 0 <= float(p["p_value"]) <= 1
    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == 6 and data["run"]["model"] == "tiny" and data["run"]["scorers"] == {"tiny": "tiny"}
    assert "<svg" in (out / "report.html").read_text()


def test_batch_size_changes_nothing_on_cpu(tmp_path, tiny_dirs):
    """Same seed, same inputs: images (bytes) and scores are identical at batch sizes 1 and 3 on CPU."""
    runs = {}
    for b in (1, 3):
        out = tmp_path / f"b{b}"
        ok(invoke("--model", "tiny", "--res", "32x32", "--prompts", str(prompts_file(tmp_path)), "-n", "2",
                  "--variants", "pruned,crdiff", *COMMON, "--batch-size", str(b), "--out", str(out)))
        runs[b] = out
    images = {b: sorted((out / "images").rglob("*.png")) for b, out in runs.items()}
    assert len(images[1]) == 16 and [p.relative_to(runs[1]) for p in images[1]] == [
        p.relative_to(runs[3]) for p in images[3]]
    assert all(one.read_bytes() == three.read_bytes() for one, three in zip(images[1], images[3]))
    records = {b: sorted(json.dumps(r, sort_keys=True) for r in map(json.loads, (out / "scores.jsonl").open())
                         if "metric" in r) for b, out in runs.items()}  # the header line names the batch size
    assert records[1] == records[3] and len(records[1]) == 16


def test_batches_share_model_calls_only_off_cpu():
    batch = work_items([Resolution(32, 32)], ["crdiff"], 3, [0])
    assert model_calls(batch, "cpu") == [[item] for item in batch]
    assert model_calls(batch, "cuda") == [batch]


def test_batched_images_have_the_single_image_noise(tiny_dirs):
    """The latents a batched call starts from are, per image, those of the single call (one generator each)."""
    import torch

    from crdiff_cli.pipelines.generation import GenerationSettings, generate_images
    from crdiff_cli.pipelines.loading import load_model

    pipe = load_model("tiny").pipe
    seen = []
    original = pipe.prepare_latents

    def spy(*args, **kwargs):
        latents = original(*args, **kwargs)
        seen.append(latents.clone())
        return latents

    pipe.prepare_latents = spy
    settings = GenerationSettings(Resolution(32, 32), steps=1)
    generate_images(pipe, PROMPTS[:3], [7, 8, 9], settings)
    for i, seed in enumerate((7, 8, 9)):
        generate_images(pipe, [PROMPTS[i]], [seed], settings)
        assert torch.equal(seen[0][i], seen[-1][0])


def _command(out: Path, prompts: Path) -> list[str]:
    return [sys.executable, "-m", "crdiff_cli", "evaluate", "--model", "tiny", "--res", "32x32", "--prompts",
            str(prompts), "-n", "2", "--variants", "pruned,crdiff", "--batch-size", "2", *COMMON, "--out", str(out)]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_results(tmp_path, tiny_dirs):
    prompts = prompts_file(tmp_path)
    env = {**os.environ}
    ref = tmp_path / "ref"
    subprocess.run(_command(ref, prompts), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    rng = random.Random(8)
    kills = 0
    args = _command(out, prompts)
    for attempt in range(3):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(2, 12)  # records (of 16) to wait for before killing
        journal = out / "scores.jsonl"
        while proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= target:
                time.sleep(rng.random() * 0.5)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                break
            time.sleep(0.02)
        args = _command(out, prompts) + ["--resume"]
        if proc.returncode == 0:
            break
    assert kills >= 1
    if not (out / "results.csv").exists():
        subprocess.run(args, check=True, env=env, capture_output=True)
    for name in ("results.csv", "paired.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert json.loads((out / "results.json").read_text())["results"] == json.loads((ref / "results.json").read_text())["results"]
    lines = sorted((out / "scores.jsonl").read_text().splitlines()[1:])
    assert lines == sorted((ref / "scores.jsonl").read_text().splitlines()[1:])
    assert len(lines) == 16
    for record in map(json.loads, lines):
        assert (out / record["image"]).read_bytes() == (ref / record["image"]).read_bytes()
    assert not [p for p in out.rglob(".*tmp*")]  # no temporaries left by the kills


def test_resume_refuses_other_settings_and_existing_run(tmp_path, tiny_dirs):
    prompts = prompts_file(tmp_path, PROMPTS[:1])
    out = tmp_path / "ev"
    base = ["--model", "tiny", "--res", "32x32", "--prompts", str(prompts), "--variants", "crdiff", "--out", str(out)]
    ok(invoke(*base, *COMMON))
    again = invoke(*base, *COMMON)
    assert again.exit_code == 2 and "--resume" in again.stderr
    other = invoke(*base, "--steps", "3", "--metrics", "tiny", "--resume")
    assert other.exit_code == 2 and "different evaluation" in other.stderr and "steps" in other.stderr
    before = (out / "scores.jsonl").read_bytes()
    done = ok(invoke(*base, *COMMON, "--resume"))  # nothing left to do: nothing appended
    assert (out / "scores.jsonl").read_bytes() == before
    assert "wrote 0 new images (1 already made)" in done.stdout


def test_disk_filling_up_is_one_line_and_resume_finishes(tmp_path, tiny_dirs, monkeypatch):
    import crdiff_cli.pipelines.images as images

    real = images.write_file
    out = tmp_path / "ev"
    base = ["--model", "tiny", "--res", "32x32", "--prompts", str(prompts_file(tmp_path, PROMPTS[:2])), "--variants",
            "dense", "--out", str(out), *COMMON]
    disk_full_on_second_write(monkeypatch, images)
    result = invoke(*base)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0], result.stderr
    monkeypatch.setattr(images, "write_file", real)
    done = ok(invoke(*base, "--resume"))
    assert "wrote 1 new image (1 already made)" in done.stdout


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_dirs, monkeypatch):
    from crdiff_cli.evaluation import protocol

    def interrupted(self, todo, on_batch=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol.Session, "run", interrupted)
    out = tmp_path / "ev"
    result = invoke("--model", "tiny", "--res", "32x32", "--prompt", "a fox", "--variants", "dense", "--out", str(out),
                    *COMMON)
    assert result.exit_code == 130 and "add --resume to continue" in result.stderr


def test_coco_captions_json(tmp_path):
    coco = {"images": [], "annotations": [
        {"image_id": 9, "id": 5, "caption": "nine, second"}, {"image_id": 9, "id": 2, "caption": " nine  first "},
        {"image_id": 3, "id": 7, "caption": "three"}, {"image_id": 4, "id": 1, "caption": "four"}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(coco))
    assert read_prompt_source(path, "first") == ["three", "four", "nine first"]  # --coco-sample first


@pytest.mark.parametrize("args, message", [
    (["--metrics", "nope"], "unknown metric 'nope'"),
    (["--metrics", "clip:/does/not/exist"], "does not exist"),
    (["--metrics", "pickscore"], "needs a model"),
    (["--metrics", "aesthetic:/missing.pth"], "aesthetic"),
    (["--metrics", "imagereward:/missing/ImageReward.pt"], "ImageReward"),
    (["--metrics", "fid"], "--reference-images"),
    (["--metrics", "tiny", "--variants", "dense,bogus"], "--variants"),
    (["--metrics", "tiny", "--variants", "dense,crdiff@0.5:0.2"], "--variants 'dense,crdiff@0.5:0.2': crdiff@0.5:0.2"),
    (["--metrics", "tiny", "--variants", "crdiff/refresh0"], "its poa-refresh 0 must be"),
    (["--metrics", "tiny", "--variants", "crdiffx"], "--variants 'crdiffx'"),
    (["--metrics", "tiny", "--variants", "crdiff@0:0.3,crdiff@0:.3"], "names a variant twice"),
    (["--metrics", "tiny", "--batch-size", "0"], "--batch-size"),
    (["--metrics", "tiny", "--limit", "0"], "--limit"),
    (["--metrics", "tiny", "--resume"], "resume"),
    (["--metrics", "tiny", "--ratios", "0.3/0.2"], "ratios"),
])
def test_bad_input_one_line_exit_2_before_loading(tmp_path, monkeypatch, args, message):
    import crdiff_cli.pipelines.loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(crdiff_cli.pipelines.loading, "load_model", no_load)
    result = invoke("--model", "tiny", "--res", "32x32", "--prompt", "x", "-n", "2", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "o").exists()


def test_fid_needs_two_images(tmp_path, monkeypatch):
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (8, 8)).save(refs / "a.png")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    base = ["--model", "tiny", "--res", "32x32", "--prompt", "x", "--out", str(tmp_path / "o"),
            "--metrics", f"fid:{weights}", "--reference-images", str(refs)]
    result = invoke(*base, "-n", "2")
    assert result.exit_code == 2 and "has 1 image" in result.stderr
    Image.new("RGB", (8, 8)).save(refs / "b.png")
    result = invoke(*base)
    assert result.exit_code == 2 and "at least 2 generated images" in result.stderr
    result = invoke(*base[:-4], "--metrics", "tiny", "--reference-images", str(refs))
    assert result.exit_code == 2 and "only used by the fid metric" in result.stderr
