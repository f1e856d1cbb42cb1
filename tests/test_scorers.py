"""Tests for crdiff_cli.scorers: spec parsing, the CLIP-family scorers, plugins and ImageReward.

Everything runs offline on models built here: the tiny CLIP (saved with save_pretrained for the clip:
and pickscore: paths) and a randomly initialised, shrunk ImageReward network made of the
image-reward package's own classes. These prove the loading and scoring code runs on the installed
transformers; they cannot prove that real weights give the published scores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import numpy as np
import pytest
import torch
from PIL import Image

from crdiff_cli.errors import CrdiffError
from crdiff_cli.scorers import Scorer, known_scorers, load_scorer

PROMPTS = ["a photo of a cat", "a red dog", "the cats"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports this checkout's crdiff_cli; return its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, check=True).stdout


def make_images(sizes=((48, 64), (64, 64), (300, 200)), modes=("RGB", "RGB", "RGB")):
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).convert(mode)
            for (w, h), mode in zip(sizes, modes, strict=True)]


def one_by_one(scorer, images, prompts):
    return [scorer.score([image], [prompt])[0] for image, prompt in zip(images, prompts, strict=True)]


# --- specs -----------------------------------------------------------------------------------------

def test_import_is_light():
    code = ("import sys, crdiff_cli.scorers; "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL', 'ImageReward') if m in sys.modules))")
    assert run_python(code).strip() == "[]"


def test_known_scorers_lists_builtins():
    assert known_scorers()[:4] == ["imagereward", "clip", "pickscore", "tiny"]


@pytest.mark.parametrize("spec, words", [
    ("nope", ["unknown scorer 'nope'", "imagereward, clip, pickscore, tiny"]),
    ("clip", ["needs a model", "clip:MODEL"]),
    ("clip:", ["needs a model"]),
    ("pickscore", ["needs a model", "pickscore:MODEL"]),
    ("tiny:extra", ["takes no argument"]),
])
def test_bad_specs(spec, words):
    with pytest.raises(CrdiffError) as e:
        load_scorer(spec)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


# --- tiny, clip:, pickscore: ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_scorer("tiny")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tiny):
    """The tiny scorer's model, tokenizer and image processor saved as an ordinary CLIP folder."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    for part in (tiny.model, tiny.tokenizer, tiny.image_processor):
        part.save_pretrained(folder)
    return folder


def test_tiny_is_a_scorer_and_deterministic(tiny):
    images = make_images()
    scores = tiny.score(images, PROMPTS)
    assert isinstance(tiny, Scorer) and tiny.name == "tiny"
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert load_scorer("tiny").score(images, PROMPTS) == scores


def test_tiny_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    load_scorer("tiny")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_tiny_batch_equals_one_by_one(tiny):
    images = make_images()
    assert tiny.score(images, PROMPTS) == pytest.approx(one_by_one(tiny, images, PROMPTS), rel=1e-5, abs=1e-4)


def test_tiny_prompts_matter(tiny):
    images = make_images()[:1] * 3
    scores = tiny.score(images, PROMPTS)
    assert len(set(scores)) == 3


def test_score_checks_pairs(tiny):
    assert tiny.score([], []) == []
    with pytest.raises(ValueError, match="one prompt per image"):
        tiny.score(make_images(), PROMPTS[:2])


def test_clip_folder_matches_tiny(clip_dir, tiny):
    scorer = load_scorer(f"clip:{clip_dir}")
    images = make_images()
    assert scorer.name == f"clip:{clip_dir}"
    assert scorer.score(images, PROMPTS) == pytest.approx(tiny.score(images, PROMPTS), rel=1e-6)


def test_pickscore_uses_the_logit_scale(clip_dir, tiny):
    scorer = load_scorer(f"pickscore:{clip_dir}")
    images = make_images()
    scale = tiny.model.logit_scale.exp().item()
    expected = [s * scale / 100 for s in tiny.score(images, PROMPTS)]
    assert scorer.scale == pytest.approx(scale)
    assert scorer.score(images, PROMPTS) == pytest.approx(expected, rel=1e-5)


def test_pickscore_falls_back_to_its_processor(tmp_path, clip_dir, tiny, monkeypatch):
    import crdiff_cli.scorers.clip as clip

    tiny.model.save_pretrained(tmp_path)  # weights only, as some PickScore folders are
    with pytest.raises(CrdiffError, match="needs a tokenizer and an image processor"):
        load_scorer(f"pickscore:{tmp_path}")
    monkeypatch.setattr(clip, "PICKSCORE_PROCESSOR", str(clip_dir))
    images = make_images()
    assert load_scorer(f"pickscore:{tmp_path}").score(images, PROMPTS) == pytest.approx(
        load_scorer(f"pickscore:{clip_dir}").score(images, PROMPTS))


def test_clip_missing_model(tmp_path):
    with pytest.raises(CrdiffError, match="not found locally"):
        load_scorer(f"clip:{tmp_path / 'nothing'}")
    with pytest.raises(CrdiffError, match="not found locally"):
        load_scorer("clip:someone/not-in-the-cache")


def test_clip_without_tokenizer(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    with pytest.raises(CrdiffError, match="preprocessor_config.json"):
        load_scorer(f"clip:{tmp_path}")


# --- plugins ----------------------------------------------------------------------------------------

PLUGIN = '''
class Constant:
    def __init__(self, arg, device):
        self.name = f"constant:{arg}"
        self.value, self.device = float(arg or 0), device
    def score(self, images, prompts):
        return [self.value] * len(images)

def not_a_scorer(arg, device):
    return object()
'''


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """An installed distribution declaring ``crdiff.scorers`` entry points (found via sys.path)."""
    (tmp_path / "crdiff_test_plugin.py").write_text(PLUGIN)
    info = tmp_path / "crdiff_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crdiff-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[crdiff.scorers]\nconstant = crdiff_test_plugin:Constant\n"
                                           "broken = crdiff_test_plugin:not_a_scorer\n"
                                           "tiny = crdiff_test_plugin:Constant\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("crdiff_test_plugin", None)


def test_plugin_scorer(plugin_dist):
    assert {"constant", "broken"} <= set(known_scorers())
    scorer = load_scorer("constant:2.5", device="meta")
    assert scorer.name == "constant:2.5" and scorer.device == "meta"
    assert scorer.score(make_images()[:2], PROMPTS[:2]) == [2.5, 2.5]
    assert load_scorer("constant").value == 0.0


def test_plugin_must_return_a_scorer(plugin_dist):
    with pytest.raises(CrdiffError, match="returned object, not a Scorer"):
        load_scorer("broken")


def test_builtins_win_over_plugins(plugin_dist):
    assert known_scorers().count("tiny") == 1
    assert load_scorer("tiny").name == "tiny" and hasattr(load_scorer("tiny"), "model")


# --- imagereward ------------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "the", "##s"]
VOCAB += list("abcdefghijklmnopqrstuvwxyz")
SMALL_MED_CONFIG = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_hidden_layers=2, max_position_embeddings=64, vocab_size=len(VOCAB) + 2,  # + [DEC] [ENC]
                        type_vocab_size=2, pad_token_id=0, hidden_act="gelu", layer_norm_eps=1e-12,
                        encoder_width=32, add_cross_attention=True)


@pytest.fixture
def ir():
    """The imagereward module, with ImageReward's ViT-L shrunk to a 2-block ViT of the same class."""
    from crdiff_cli.scorers import imagereward
    from crdiff_cli.scorers._imagereward_blip import blip_modules

    package = blip_modules()

    def small_vit(vit, image_size):
        return package.vit.VisionTransformer(img_size=image_size, patch_size=32, embed_dim=32, depth=2,
                                             num_heads=4), 32

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(package.blip, "create_vit", small_vit)
        yield imagereward


@pytest.fixture
def ir_dir(tmp_path, ir):
    """A folder laid out like ~/.cache/ImageReward: random weights, med_config.json, a WordPiece vocab."""
    folder = tmp_path / "ImageReward"
    (folder / "bert-base-uncased").mkdir(parents=True)
    (folder / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "med_config.json").write_text(json.dumps(SMALL_MED_CONFIG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ir.ImageRewardModel(folder / "med_config.json")
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    return folder


def test_imagereward_scores(ir_dir):
    scorer = load_scorer(f"imagereward:{ir_dir}")
    images = make_images(modes=("RGB", "RGBA", "L"))
    scores = scorer.score(images, PROMPTS)
    assert isinstance(scorer, Scorer) and scorer.name == f"imagereward:{ir_dir / 'ImageReward.pt'}"
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scorer.score(images, PROMPTS) == scores
    assert load_scorer(f"imagereward:{ir_dir / 'ImageReward.pt'}").score(images, PROMPTS) == scores
    assert scores == pytest.approx(one_by_one(scorer, images, PROMPTS), abs=1e-5)
    assert len(set(scorer.score(images[:1] * 3, PROMPTS))) == 3


def test_imagereward_sees_256_then_224(ir, ir_dir, monkeypatch):
    seen, transform = [], ir.ir_transform
    monkeypatch.setattr(ir, "ir_transform", lambda image: seen.append((image.size, image.mode)) or transform(image))
    load_scorer(f"imagereward:{ir_dir}").score(make_images(modes=("RGB", "RGBA", "L")), PROMPTS)
    assert seen == [((256, 256), "RGB")] * 3
    grey = Image.new("RGB", (256, 256), (51, 102, 204))
    expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(ir.CLIP_MEAN)) / torch.tensor(ir.CLIP_STD)
    pixels = ir.ir_transform(grey)
    assert pixels.shape == (3, 224, 224)
    assert torch.allclose(pixels, expected.view(3, 1, 1).expand(3, 224, 224), atol=1e-6)


def test_imagereward_tokenizer_from_hf_cache(ir_dir, tmp_path, monkeypatch):
    import huggingface_hub

    folder, cached = tmp_path / "weights", ir_dir / "bert-base-uncased"
    folder.mkdir()
    for name in ("ImageReward.pt", "med_config.json"):
        (ir_dir / name).rename(folder / name)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: str(cached / filename) if repo == "bert-base-uncased" else None)
    assert len(load_scorer(f"imagereward:{folder}").score(make_images()[:1], PROMPTS[:1])) == 1


def test_imagereward_missing_files(ir, ir_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(CrdiffError, match=r"ImageReward.pt and med_config.json not in .*home/.cache/ImageReward"):
        load_scorer("imagereward")
    with pytest.raises(CrdiffError, match="does not exist"):
        load_scorer(f"imagereward:{tmp_path / 'nope.pt'}")
    (ir_dir / "med_config.json").rename(tmp_path / "med_config.json")
    with pytest.raises(CrdiffError, match=r"files missing: med_config.json not in"):
        load_scorer(f"imagereward:{ir_dir / 'ImageReward.pt'}")
    (tmp_path / "med_config.json").rename(ir_dir / "med_config.json")
    (ir_dir / "bert-base-uncased" / "vocab.txt").unlink()
    with pytest.raises(CrdiffError, match=r"bert-base-uncased tokenizer: put its vocab.txt in"):
        load_scorer(f"imagereward:{ir_dir}")


class NotTensors:
    """Pickled by reference: a weights_only load must refuse it instead of importing this module."""


@pytest.mark.parametrize("content, message", [
    (lambda state: {**state, "extra.weight": torch.zeros(1)}, "1 unexpected"),
    (lambda state: {k: v for k, v in state.items() if not k.startswith("mlp.")}, "10 keys missing"),
    (lambda state: {**state, "mlp.layers.7.bias": torch.zeros(2)}, "tensor shapes differ"),
    (lambda state: [1, 2], "holds a list"),
    (lambda state: {"x": NotTensors()}, "cannot read .* as a state dict"),
])
def test_imagereward_bad_checkpoints(ir_dir, content, message):
    path = ir_dir / "ImageReward.pt"
    torch.save(content(torch.load(path, weights_only=True)), path)
    with pytest.raises(CrdiffError, match=message):
        load_scorer(f"imagereward:{ir_dir}")


def test_imagereward_not_installed(monkeypatch):
    import importlib.util

    from crdiff_cli.scorers import _imagereward_blip

    for name in [n for n in sys.modules if n.startswith(_imagereward_blip.PACKAGE)]:
        monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ImageReward" else real(name, *a))
    with pytest.raises(CrdiffError, match=r"pip install --no-deps image-reward==1\.5"):
        load_scorer("imagereward")


def test_imagereward_import_leaves_no_trace():
    """Run in a fresh process: the BLIP modules are imported once per process."""
    code = """if True:
        import sys, warnings
        import transformers.modeling_utils as real
        filters = list(warnings.filters)
        from crdiff_cli.scorers._imagereward_blip import blip_modules
        package = blip_modules()
        assert package.med.BertModel and package.vit.VisionTransformer and package.blip.create_vit
        assert warnings.filters == filters, "blip.py's filterwarnings('ignore') leaked"
        assert sys.modules["transformers.modeling_utils"] is real
        leaked = [m for m in sys.modules if m.split(".")[0] in ("timm", "fairscale", "torchvision", "ImageReward")]
        assert not leaked, leaked
    """
    run_python(code)
