"""The paper's MS-COCO 5K prompt sample (`--coco-sample paper`), the saved prompt set, and FID's
preprocessing (`--fid-resize`).

The sampler is checked against ``authors_sampler`` below: a restatement of the authors' published
preprocessing script written here on its own (it shares no code with crdiff_cli.evaluation.coco), run on
a synthetic captions JSON shaped like ``captions_val2014.json`` (6,000 images listed out of order, captions
interleaved, some files missing from the reference folder).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import invoke, ok, run

N_IMAGES = 6000
WORDS = ["a", "dog", "cat", "on", "the", "red", "bus", "street", "café", "with", "two", "people", "kitchen", "near"]


# --- the authors' script, restated independently --------------------------------------------------------


def authors_sampler(json_path: Path, image_root: Path | None) -> list[tuple[str, str, str]]:
    """``(prompt_name, caption, image file)`` rows, in the order the authors' script writes its CSV.

    The script: captions grouped by image in a dict filled in annotation order; ``random.seed(42)``;
    ``random.sample(list of the dict's image ids, 5000)``; for each drawn id, in order, skip it when its file
    is not in the image folder (before any draw), else ``random.choice`` of its captions, named ``prompt_{i}``.
    File names come from ``images`` (unlisted: a name no folder holds). ``image_root=None``: nothing is missing.
    (The caption passes through the script's CSV unchanged: checked below.)
    """
    with open(json_path, encoding="utf-8") as handle:
        coco = json.load(handle)
    file_of = {entry["id"]: entry["file_name"] for entry in coco["images"]}
    by_image: dict = defaultdict(list)
    for annotation in coco["annotations"]:
        by_image[annotation["image_id"]].append(annotation["caption"])
    saved = random.getstate()
    try:
        random.seed(42)
        drawn = random.sample(list(by_image.keys()), 5000)
        rows = []
        for position, image_id in enumerate(drawn):
            name = file_of.get(image_id, "UNKNOWN_FILENAME")
            if image_root is not None and not os.path.exists(os.path.join(image_root, name)):
                continue
            # the pair's image: for one the ``images`` list lacks, its val2014 name (the script has none)
            rows.append((f"prompt_{position}", random.choice(by_image[image_id]), file_of.get(image_id, val2014(image_id))))
    finally:
        random.setstate(saved)
    # through the script's CSV and back, as its evaluation reads the prompts
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("prompt_name", "caption"), *[(n, c) for n, c, _ in rows]])
    read_back = list(csv.reader(io.StringIO(buffer.getvalue())))[1:]
    assert read_back == [[n, c] for n, c, _ in rows]
    return rows


def drawn_ids(json_path: Path) -> list[int]:
    """The 5,000 image ids the script's ``random.sample`` draws (they do not depend on the folder)."""
    coco = json.loads(Path(json_path).read_text(encoding="utf-8"))
    order = list(dict.fromkeys(a["image_id"] for a in coco["annotations"]))
    state = random.getstate()
    try:
        random.seed(42)
        return random.sample(order, 5000)
    finally:
        random.setstate(state)


def val2014(image_id: int) -> str:
    return "COCO_val2014_%012d.jpg" % image_id


# --- fixtures ----------------------------------------------------------------------------------------


def write_captions(path: Path, n_images: int, seed: int = 3, unlisted: int = 3) -> Path:
    """A captions JSON like COCO's: images and their captions interleaved in random order, captions with
    COCO's stray whitespace, ``images`` in another order (with extra images and ``unlisted`` annotated images
    missing from it)."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 600_000), n_images)
    annotations, ann_id = [], 0
    for image_id in ids:
        for c in range(rng.randint(2, 7)):
            ann_id += 1
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + f" #{image_id}.{c}"
            text = rng.choice(["", " ", "\n", " .", "  "]).join(["A" if c % 2 else "The", text]) + rng.choice(["", " ", "\n"])
            annotations.append({"image_id": image_id, "id": rng.randint(1, 10**7) * 10 + c, "caption": text})
    rng.shuffle(annotations)
    images = [{"id": i, "file_name": val2014(i), "height": 480, "width": 640} for i in ids[unlisted:]]
    images += [{"id": 700_000 + i, "file_name": val2014(700_000 + i)} for i in range(20)]  # no captions
    rng.shuffle(images)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return write_captions(tmp_path_factory.mktemp("coco") / "captions_val2014.json", N_IMAGES)


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory, captions) -> Path:
    """A val2014 folder missing the 2nd drawn image and every 9th from the 10th (the first prompts have a gap); the
    first present files are real JPEGs of several sizes and modes (FID reads them), the others are empty."""
    folder = tmp_path_factory.mktemp("val2014")
    drawn = drawn_ids(captions)
    missing = {drawn[1], *drawn[9::9]}
    rng = np.random.default_rng(5)
    real = 0
    for image_id in drawn:
        if image_id in missing:
            continue
        path = folder / val2014(image_id)
        if real < 6:
            size = [(64, 48), (40, 56), (33, 33), (80, 60), (50, 40), (48, 64)][real]
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(pixels) if real != 2 else Image.fromarray(pixels[..., 0], "L")  # a grey one
            image.save(path, format="JPEG")
            real += 1
        else:
            path.touch()
    for i in range(5):
        (folder / val2014(900_000 + i)).touch()  # images of no caption: never part of the set
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail the test: the checks under test must refuse before one."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("crdiff_cli.pipelines.loading.load_model", boom)


# --- the sampler -------------------------------------------------------------------------------------


def as_rows(prompt_set) -> list[tuple[str, str, str]]:
    return [(p.name, p.caption, p.file) for p in prompt_set.pairs]


def test_paper_sampler_equals_the_authors_script_without_a_folder(captions):
    from crdiff_cli.evaluation.coco import prompt_set

    expected = authors_sampler(captions, None)
    got = prompt_set(captions)
    assert len(expected) == 5000 and as_rows(got) == expected  # bit for bit, in order
    assert [p.name for p in got.pairs] == [f"prompt_{i}" for i in range(5000)]
    assert [p.image_id for p in got.pairs] == drawn_ids(captions)
    assert got.missing == () and got.sampler == "paper" and got.seed == 42
    assert got.source_sha256 == hashlib.sha256(captions.read_bytes()).hexdigest()
    # drawn, not sorted, and the captions verbatim (COCO's stray spaces and line breaks kept)
    assert got.prompts != sorted(got.prompts) and any(c.endswith(("\n", " ")) for c in got.prompts)


def test_paper_sampler_equals_the_authors_script_with_a_folder(captions, val_folder):
    from crdiff_cli.evaluation.coco import prompt_set

    expected = authors_sampler(captions, val_folder)
    got = prompt_set(captions, "paper", val_folder)
    assert as_rows(got) == expected
    assert 4000 < len(expected) < 5000 and expected[0][0] == "prompt_0" and expected[1][0] == "prompt_2"  # gaps kept
    # a skipped image draws no caption: from the first gap on, the captions differ from the folder-less sample
    without = {name: caption for name, caption, _ in authors_sampler(captions, None)}
    assert any(without[name] != caption for name, caption, _ in expected)
    drawn = drawn_ids(captions)
    assert len(got.missing) == 5000 - len(expected)
    # images the ``images`` list lacks count as missing even though a file of their val2014 name is there
    coco = json.loads(captions.read_text(encoding="utf-8"))
    unlisted = {a["image_id"] for a in coco["annotations"]} - {i["id"] for i in coco["images"]}
    assert unlisted & set(drawn) and all((val_folder / val2014(i)).exists() for i in unlisted & set(drawn))
    assert {val2014(i) for i in unlisted & set(drawn)} <= set(got.missing)
    assert set(got.missing) <= {val2014(i) for i in drawn}  # named by file
    assert got.reference_files() == [val_folder.resolve() / file for _, _, file in expected]
    assert got.head(3).reference_files() == [val_folder.resolve() / file for _, _, file in expected[:3]]


def test_same_pairs_whatever_the_hash_seed(captions, val_folder):
    from crdiff_cli.evaluation.coco import prompt_set, prompt_set_text

    code = ("import hashlib, sys\nfrom crdiff_cli.evaluation.coco import prompt_set, prompt_set_text\n"
            "for folder in (None, sys.argv[2]):\n"
            "    print(hashlib.sha256(prompt_set_text(prompt_set(sys.argv[1], None, folder)).encode()).hexdigest())\n")
    outputs = []
    for hash_seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = run(sys.executable, "-c", code, captions, val_folder, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())
    here = [hashlib.sha256(prompt_set_text(prompt_set(captions, None, f)).encode()).hexdigest()
            for f in (None, val_folder)]
    assert outputs[0] == outputs[1] == outputs[2] == here and here[0] != here[1]


def test_first_sampler_is_the_earlier_rule(tmp_path):
    from crdiff_cli.evaluation.coco import prompt_set

    coco = {"images": [], "annotations": [
        {"image_id": 9, "id": 5, "caption": "nine, second"}, {"image_id": 9, "id": 2, "caption": " nine  first "},
        {"image_id": 3, "id": 7, "caption": "three"}, {"image_id": 4, "id": 1, "caption": "four"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    got = prompt_set(path, "first")
    assert got.prompts == ["three", "four", "nine first"] and got.seed is None
    assert [p.file for p in got.pairs] == [val2014(3), val2014(4), val2014(9)]


def test_saved_prompt_set_round_trip(tmp_path, captions, val_folder):
    from crdiff_cli.errors import CrdiffError
    from crdiff_cli.evaluation.coco import prompt_set, save_prompt_set
    from crdiff_cli.evaluation.protocol import prompt_source

    sampled = prompt_set(captions, "paper", val_folder)
    path = save_prompt_set(sampled, tmp_path / "sets" / "coco5k.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "crdiff-coco-prompt-set/1" and data["seed"] == 42 and data["sampler"] == "paper"
    assert data["source_sha256"] == hashlib.sha256(captions.read_bytes()).hexdigest()
    assert [(p["name"], p["caption"], p["file"]) for p in data["pairs"]] == authors_sampler(captions, val_folder)
    assert len(data["missing"]) == len(sampled.missing)
    assert not [p for p in path.parent.iterdir() if p.name != "coco5k.json"]  # no staging left

    again = prompt_set(path)
    assert again.pairs == sampled.pairs and again.saved
    # the same run identity as the captions JSON it came from
    assert prompt_source(prompt=None, prompts_file=path, limit=3).identity() == \
        prompt_source(prompt=None, prompts_file=captions, reference_images=val_folder, limit=3).identity()
    save_prompt_set(sampled, path)  # the same set: nothing to do
    with pytest.raises(CrdiffError, match="--overwrite"):
        save_prompt_set(prompt_set(captions), path)  # another set: not without overwrite
    save_prompt_set(prompt_set(captions), path, overwrite=True)
    (tmp_path / "mine.json").write_text("{}")
    with pytest.raises(CrdiffError, match="not a prompt set written by crdiff"):
        save_prompt_set(sampled, tmp_path / "mine.json", overwrite=True)


# --- the command: bad input, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    files = {"syntax": folder / "syntax.json", "shape": folder / "shape.json", "caption": folder / "caption.json",
             "few": folder / "captions_4999.json", "text": folder / "prompts.txt", "empty_val": folder / "val2014"}
    files["syntax"].write_text('{"annotations": [{"image_id": 1, "caption": "a"}')
    files["shape"].write_text(json.dumps({"annotations": {"image_id": 1}}))
    files["caption"].write_text(json.dumps({"annotations": [{"image_id": 1, "id": 1}]}))
    write_captions(files["few"], 4999, unlisted=0)
    files["text"].write_text("a red cube\n")
    files["empty_val"].mkdir()
    (files["empty_val"] / "COCO_val2014_000000000001.jpg").touch()  # a file, but of no sampled image
    return files


@pytest.mark.parametrize("prompts, args, message", [
    ("syntax", [], "is not valid JSON"),
    ("shape", [], "is not an MS-COCO captions JSON"),
    ("caption", [], "is not an MS-COCO captions JSON"),
    ("few", [], "has captions for 4,999 images; the paper's sampler draws 5,000"),
    ("captions", ["--reference-images", "empty_val"], "holds none of the 5,000 sampled images"),
    ("captions", ["--reference-images", "nowhere"], "--reference-images"),
    ("captions", ["--coco-sample", "random"], "--coco-sample random is not a sampler"),
    ("text", ["--coco-sample", "paper"], "--coco-sample paper applies to an MS-COCO captions JSON"),
    ("text", ["--save-prompt-set", "set.json"], "--save-prompt-set writes the prompt set of a COCO captions JSON"),
    ("captions", ["--fid-resize", "512"], "--fid-resize 512 must be 256"),
    ("captions", ["--fid-resize", "none"], "--fid-resize is only used by the fid metric"),
    ("captions", ["--coco-sample", "first", "--reference-images", "empty_val"], "only used by the fid metric"),
])
def test_bad_input_one_line_exit_2_before_loading(tmp_path, no_model_load, captions, bad_inputs, prompts, args,
                                                 message):
    paths = {**bad_inputs, "captions": captions, "nowhere": tmp_path / "nowhere"}
    args = [str(paths.get(a, tmp_path / a if a.endswith(".json") else a)) for a in args]
    result = invoke("evaluate", "--model", "tiny", "--res", "32x32", "--steps", "1", "--metrics", "tiny",
                    "--prompts", paths[prompts], "--out", tmp_path / "o", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "set.json").exists()


def png_prompt(path: Path) -> str:
    with Image.open(path) as image:
        return json.loads(image.text["crdiff"])["prompt"]


def test_evaluate_uses_the_paper_samplers_first_prompts(tmp_path, tiny_dirs, captions):
    from crdiff_cli.evaluation.protocol import prompts_hash

    out, saved = tmp_path / "ev", tmp_path / "coco5k.json"
    ok(invoke("evaluate", "--model", "tiny", "--prompts", captions, "--limit", "3", "--res", "32x32", "--steps", "1",
              "--metrics", "tiny", "--variants", "dense", "--out", out, "--save-prompt-set", saved))
    expected = authors_sampler(captions, None)
    first3 = [caption for _, caption, _ in expected[:3]]
    assert [png_prompt(out / "images" / "32x32" / "dense" / f"{i}_0.png") for i in range(3)] == first3
    run_info = json.loads((out / "results.json").read_text())["run"]
    assert run_info["prompts_sha256"] == prompts_hash(first3) and run_info["num_prompts"] == 3
    assert run_info["prompt_set"]["sampler"] == "paper" and run_info["prompt_set"]["seed"] == 42
    assert run_info["fid_resize"] is None  # no FID in this run
    assert "the paper&#x27;s sampler (seed 42" in (out / "report.html").read_text()
    data = json.loads(saved.read_text(encoding="utf-8"))  # the whole set, not only the 3 used
    assert [(p["name"], p["caption"], p["file"]) for p in data["pairs"]] == expected


# --- FID preprocessing ------------------------------------------------------------------------------


def hand_resized(paths: list[Path], resize: int | None) -> list[np.ndarray]:
    """The files as the paper's evaluation prepares them, by hand: PIL bicubic to resize x resize (aspect
    ratio not kept), then RGB; ``None``: as they are."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            if resize is not None:
                image = image.resize((resize, resize), Image.BICUBIC)
            arrays.append(np.asarray(image.convert("RGB")))
    return arrays


def test_fid_resize_256_is_bicubic_256_of_both_sets(tmp_path, inception_weights, val_folder):
    """What FidScorer feeds to the Inception metric, reference and generated images alike, is exactly the
    hand-made 256x256 bicubic resize (or, with none, the images as they are)."""
    from crdiff_cli.evaluation.fid import FidScorer, fid_class

    refs = sorted(p for p in val_folder.iterdir() if p.stat().st_size)  # JPEGs of 6 sizes, one grey
    assert len({Image.open(p).size for p in refs}) == 6 and "L" in {Image.open(p).mode for p in refs}
    rng = np.random.default_rng(9)
    fakes = []
    for i, size in enumerate([(32, 32), (48, 32), (32, 32)]):
        fakes.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(fakes[-1])
    fed = []

    def record(self, imgs, real):
        assert imgs.dtype == torch.uint8 and imgs.shape[1] == 3
        fed.extend((real, image.permute(1, 2, 0).numpy()) for image in imgs)

    with mock.patch.object(fid_class(), "update", record), \
            mock.patch.object(fid_class(), "compute", lambda self: torch.tensor(0.0)):
        for resize in (256, None):
            fed.clear()
            scorer = FidScorer(inception_weights, refs, batch_size=4, resize=resize)
            scorer.distance(fakes)
            expected = [(True, a) for a in hand_resized(refs, resize)] + [(False, a) for a in hand_resized(fakes, resize)]
            assert [real for real, _ in fed] == [real for real, _ in expected]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(fed, expected))
            if resize == 256:
                assert {a.shape for _, a in fed} == {(256, 256, 3)}
            else:
                assert {a.shape[:2] for _, a in fed} == {(h, w) for w, h in
                                                          [Image.open(p).size for p in refs + fakes]}
    # and through the real (random-weight) Inception: images of any size and mode, one finite number
    value = FidScorer(inception_weights, refs[:3], batch_size=2, resize=256).distance(fakes[:2])
    assert np.isfinite(value)


class RecordingFid:
    """Stands in for FidScorer in an end-to-end run: records its reference files, preprocessing and the images
    it is asked about (the real scorer is tested above and in tests/test_eval_metrics.py)."""

    calls: list = []

    def __init__(self, weights, references, device="cpu", batch_size=16, resize=None):
        self.calls.append(("init", [Path(p) for p in references], resize))

    def distance(self, images):
        self.calls.append(("distance", [Path(p) for p in images]))
        return 12.5


@pytest.mark.parametrize("fid_resize", ["256", "none"])
def test_fid_on_the_sampled_images_and_recorded(tmp_path, tiny_dirs, monkeypatch, captions, val_folder, fid_resize):
    """FID's reference set is the prompt set's own files (not the folder), preprocessed as --fid-resize says
    (256 by default); results.json and report.html record the choice."""
    monkeypatch.setattr("crdiff_cli.evaluation.fid.FidScorer", RecordingFid)
    monkeypatch.setattr(RecordingFid, "calls", [])
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not read: the scorer is replaced")
    out = tmp_path / "ev"
    extra = [] if fid_resize == "256" else ["--fid-resize", fid_resize]
    result = ok(invoke("evaluate", "--model", "tiny", "--prompts", captions, "--reference-images", val_folder,
                       "--limit", "3", "--res", "32x32", "--steps", "1", "--metrics", f"tiny,fid:{weights}",
                       "--variants", "dense", "--out", out, *extra))
    assert "are not in" in result.stderr and "skipped" in result.stderr  # the missing images are reported
    expected = authors_sampler(captions, val_folder)[:3]
    assert [png_prompt(out / "images" / "32x32" / "dense" / f"{i}_0.png") for i in range(3)] == \
        [caption for _, caption, _ in expected]
    resize = 256 if fid_resize == "256" else None
    assert RecordingFid.calls == [
        ("init", [val_folder.resolve() / file for _, _, file in expected], resize),  # the 3 sampled images only
        ("distance", [out / "images" / "32x32" / "dense" / f"{i}_0.png" for i in range(3)])]
    data = json.loads((out / "results.json").read_text())
    assert data["run"]["fid_resize"] == fid_resize
    assert [(r["n"], r["mean"]) for r in data["results"] if r["metric"] == "fid"] == [(3, 12.5)]
    page = (out / "report.html").read_text()
    assert f"FID preprocessing (--fid-resize {fid_resize})" in page
    assert ("256x256 (PIL bicubic" in page) == (fid_resize == "256")
