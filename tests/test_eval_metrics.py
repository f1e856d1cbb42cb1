"""Metrics and statistics of `crdiff evaluate`: Fréchet distance, FID through torchmetrics' real Inception,
the aesthetic predictors (LAION v2 and v2.5 heads on tiny backbones), CLIP as a cosine, bootstrap/paired stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from crdiff_cli.errors import CrdiffError
from crdiff_cli.evaluation.metrics import ImageMetric, MetricSpec, parse_metrics
from crdiff_cli.evaluation.stats import bootstrap_ci, paired, summarize


def scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_on_gaussians():
    from crdiff_cli.evaluation.fid import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    # two isotropic Gaussians: |mu1 - mu2|^2 + d (sigma1 - sigma2)^2
    assert frechet_distance(np.zeros(4), 4 * np.eye(4), np.ones(4), np.eye(4)) == pytest.approx(4 + 4 * (2 - 1) ** 2)


def _images(folder: Path, seed: int, n: int, size=(40, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_fid_through_torchmetrics_real_inception(tmp_path, inception_weights):
    from crdiff_cli.evaluation.fid import FidScorer

    refs = _images(tmp_path / "refs", 1, 3)
    fakes = _images(tmp_path / "fakes", 2, 3, size=(24, 24))
    scorer = FidScorer(inception_weights, refs, batch_size=2)

    def features(paths):
        batch = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)
        with torch.no_grad():
            return scorer.metric.inception(batch).double().numpy()

    fr, ff = features(refs), features(fakes)
    expected = scipy_fid(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    value = scorer.distance(fakes)
    assert value == pytest.approx(expected, rel=1e-3, abs=0) and value > 0  # FIDs here are ~1e-13: no absolute slack
    assert scorer.distance(fakes) == value  # the reference statistics are kept, the generated ones reset
    assert abs(scorer.distance(refs)) < 1e-3 * value


def _save_head(path: Path, prefix: str, linears, width: int) -> dict:
    sizes = [width, 1024, 128, 64, 16, 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        state = {}
        for n, i in enumerate(linears):
            state[f"{prefix}{i}.weight"] = torch.randn(sizes[n + 1], sizes[n]) / sizes[n] ** 0.5
            state[f"{prefix}{i}.bias"] = torch.randn(sizes[n + 1])
    torch.save(state, path)
    return state


def _mlp(state, prefix, linears, x):
    for n, i in enumerate(linears):
        x = x @ state[f"{prefix}{i}.weight"].T + state[f"{prefix}{i}.bias"]
    return x


def test_aesthetic_v2_on_a_clip_backbone(tmp_path):
    from crdiff_cli.scorers.aesthetic import load
    from crdiff_cli.scorers.clip import tiny_clip

    model, tokenizer, processor = tiny_clip()
    model.save_pretrained(tmp_path / "clip-vit-large-patch14")
    processor.save_pretrained(tmp_path / "clip-vit-large-patch14")
    state = _save_head(tmp_path / "head.pth", "layers.", (0, 2, 4, 6, 7), 32)
    scorer = load(str(tmp_path / "head.pth"), "cpu")
    assert scorer.name.startswith("aesthetic-v2:")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "navy")]
    with torch.no_grad():
        emb = model.get_image_features(**processor(images=images, return_tensors="pt"))
        emb = getattr(emb, "pooler_output", emb)
        expected = _mlp(state, "layers.", (0, 2, 4, 6, 7), emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert scorer.score(images, ["", ""]) == pytest.approx(expected.tolist(), rel=1e-5)


def test_aesthetic_v25_on_a_siglip_backbone(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from crdiff_cli.scorers.aesthetic import _siglip_processor_class, load

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    torch.manual_seed(3)
    model = SiglipVisionModel(config).eval()
    processor = _siglip_processor_class()(size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path / "siglip-so400m-patch14-384")
    processor.save_pretrained(tmp_path / "siglip-so400m-patch14-384")
    state = _save_head(tmp_path / "aesthetic_predictor_v2_5.pth", "scoring_head.", (0, 2, 4, 6, 8), 32)
    scorer = load(str(tmp_path / "aesthetic_predictor_v2_5.pth"), "cpu")
    assert scorer.name.startswith("aesthetic-v2.5:")
    images = [Image.new("RGB", (33, 50), "green")]
    with torch.no_grad():
        emb = model(**processor(images=images, return_tensors="pt")).pooler_output
        expected = _mlp(state, "scoring_head.", (0, 2, 4, 6, 8), emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert scorer.score(images, [""]) == pytest.approx(expected.tolist(), rel=1e-5)


def test_aesthetic_refuses_a_pickle_with_code(tmp_path):
    import pickle

    from crdiff_cli.scorers.aesthetic import read_head

    class Evil:
        def __reduce__(self):
            return (exec, ("open('{}', 'w').write('ran')".format(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"layers.0.weight": Evil()}))
    with pytest.raises(CrdiffError, match="cannot read aesthetic head"):
        read_head(path)
    assert not (tmp_path / "pwned").exists()


def test_clip_metric_is_the_cosine(tmp_path):
    from crdiff_cli.scorers.clip import ClipScorer, tiny_clip

    model, tokenizer, processor = tiny_clip()
    folder = tmp_path / "clip"
    for part in (model, tokenizer, processor):
        part.save_pretrained(folder)
    metric = ImageMetric(MetricSpec("clip", str(folder)), "cpu")
    images, prompts = [Image.new("RGB", (32, 32), "white")] * 2, ["a", "b c"]
    raw = ClipScorer("x", *tiny_clip(), scale=100).score(images, prompts)
    assert metric.score(images, prompts) == pytest.approx([r / 100 for r in raw])
    assert all(-1 <= s <= 1 for s in metric.score(images, prompts))


def test_metric_specs_are_parsed_in_table_order(tmp_path):
    specs = parse_metrics("tiny, clip:" + str(tmp_path), reference_images=None, num_generated=1)
    assert [s.name for s in specs] == ["clip", "tiny"] and specs[0].arg == str(tmp_path)
    with pytest.raises(CrdiffError, match="twice"):
        parse_metrics("tiny,tiny", reference_images=None, num_generated=1)


def test_bootstrap_and_paired_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 1, size=200)
    low, high = bootstrap_ci(x)
    assert low < x.mean() < high and high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)
    assert bootstrap_ci(x) == (low, high)  # fixed seed
    s = summarize(x)
    assert s.n == 200 and s.mean == pytest.approx(x.mean()) and s.std == pytest.approx(x.std(ddof=1))
    same = paired(x, x)
    assert same.mean_diff == 0 and same.p_value == 1.0 and same.win_rate == 0.5
    better = paired(x + 0.5 + rng.normal(0, 0.1, 200), x)
    assert better.p_value < 1e-6 and better.win_rate == 1.0 and better.ci_low > 0.4
    noise = paired(x + rng.normal(0, 1, 200), x)
    assert noise.p_value > 0.01 and noise.ci_low < 0 < noise.ci_high
    lower = paired([1.0, 2.0], [2.0, 3.0], higher_is_better=False)  # FID-like: a is lower, so a wins
    assert lower.win_rate == 1.0 and lower.mean_diff == -1.0
