"""Model loading (tiny models, folders, files, hub ids), family detection and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.loading import PRUNE_RECORD, load_model
from crdiff_cli.pipelines.tiny import TINY_MODELS, build_tiny_pipeline, tiny_model_path
from crdiff_cli.pruning.family import FAMILIES, detect_family
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.spec import PruneSpec, prune_


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CrdiffError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# --- tiny models ------------------------------------------------------------------------------------

def test_tiny_models_load_as_real_pipelines(tiny_readonly):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    sd, xl = tiny_readonly["tiny"], tiny_readonly["tiny-sdxl"]
    assert type(sd.pipe) is StableDiffusionPipeline and sd.family == "sd15" and sd.source == "tiny"
    assert type(xl.pipe) is StableDiffusionXLPipeline and xl.family == "sdxl" and xl.source == "tiny-sdxl"
    assert TINY_MODELS == {"tiny": "sd15", "tiny-sdxl": "sdxl"}
    for loaded in (sd, xl):
        assert isinstance(loaded.unet, UNet2DConditionModel) and loaded.unet is loaded.pipe.unet
        assert loaded.unet.dtype == torch.float32
        types = [type(b).__name__ for b in loaded.unet.down_blocks] + [type(loaded.unet.mid_block).__name__] + \
            [type(b).__name__ for b in loaded.unet.up_blocks]
        assert all("CrossAttn" in t for t in types), types  # transformer blocks in down, mid and up
        ids = loaded.pipe.tokenizer("a red cube", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and ids[0] == loaded.pipe.tokenizer.bos_token_id
    assert xl.unet.config.addition_embed_type == "text_time" and xl.pipe.text_encoder_2 is not None
    assert detect_family(xl.unet.config) == "sdxl"
    assert detect_family(sd.unet.config) == "unknown"  # 32-d cross-attention; the tiny name says sd15


def test_tiny_model_dtypes(load_tiny):
    assert load_tiny("tiny", "fp16").unet.dtype == torch.float16
    assert load_tiny("tiny-sdxl", "bf16").unet.dtype == torch.bfloat16
    message = one_line_error(load_model, "tiny", dtype="fp64")
    assert "fp64" in message and "fp32" in message


def folder_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def folder_configs(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*.json"))}


def test_tiny_build_is_deterministic_across_cache_dirs(tmp_path, monkeypatch, tiny_dirs):
    state = torch.random.get_rng_state()
    paths = {}
    for where in ("a", "b"):
        monkeypatch.setenv("CRDIFF_CACHE", str(tmp_path / where))
        paths[where] = tiny_model_path("tiny")
        assert paths[where].is_relative_to(tmp_path / where) and (paths[where] / "model_index.json").is_file()
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the global RNG alone
    a, b = paths["a"], paths["b"]
    assert_same_tensors(folder_tensors(a), folder_tensors(b))
    assert_same_tensors(folder_tensors(a), folder_tensors(tiny_dirs["tiny"]))  # and the session's build
    assert folder_configs(a) == folder_configs(b)
    assert len(folder_tensors(a)) > 100
    # the SDXL-shaped one too: a fresh in-memory build equals the session's cached folder
    xl = build_tiny_pipeline("tiny-sdxl")
    cached = load_model("tiny-sdxl").pipe
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_tensors(getattr(xl, name).state_dict(), getattr(cached, name).state_dict())


def test_tiny_cache_is_reused(tiny_dirs):
    before = {f: f.stat().st_mtime_ns for f in tiny_dirs["tiny"].rglob("*") if f.is_file()}
    assert tiny_model_path("tiny") == tiny_dirs["tiny"]
    assert {f: f.stat().st_mtime_ns for f in tiny_dirs["tiny"].rglob("*") if f.is_file()} == before


def test_unknown_tiny_name():
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_pipeline("tiny-sd3")


# --- family detection -------------------------------------------------------------------------------

@pytest.mark.parametrize("config, family", [
    ({"cross_attention_dim": 768}, "sd15"),
    ({"cross_attention_dim": 1024}, "sd21"),
    ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "sdxl"),
    ({"cross_attention_dim": 768, "addition_embed_type": "text_time"}, "sdxl"),
    ({"cross_attention_dim": 1280}, "unknown"),
    ({"cross_attention_dim": 32}, "unknown"),
    ({}, "unknown"),
    ({"cross_attention_dim": 2048, "addition_embed_type": "text"}, "unknown"),
])
def test_detect_family(config, family):
    assert detect_family(config) == family
    assert family in FAMILIES


# --- errors: one CrdiffError line each ---------------------------------------------------------------

def test_missing_path(tmp_path):
    message = one_line_error(load_model, str(tmp_path / "nope"))
    assert "does not exist" in message and "tiny" in message
    assert "does not exist" in one_line_error(load_model, "./not-here")


def test_folder_without_model_index(tmp_path, tiny_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "model_index.json is missing" in one_line_error(load_model, str(empty))
    unet_folder = tmp_path / "unet"
    shutil.copytree(tiny_dirs["tiny"] / "unet", unet_folder)
    message = one_line_error(load_model, str(unet_folder))
    assert "model_index.json is missing" in message and "UNet folder" in message


@pytest.fixture
def tiny_copy(tmp_path, tiny_dirs) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_dirs["tiny"], folder)
    return folder


def test_corrupt_unet_weights(tiny_copy):
    (tiny_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 64)
    message = one_line_error(load_model, str(tiny_copy))
    assert "cannot load the pipeline" in message and str(tiny_copy) in message


def test_truncated_unet_weights(tiny_copy):
    weights = tiny_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "cannot load the pipeline" in one_line_error(load_model, str(tiny_copy))


def test_corrupt_model_index(tiny_copy):
    (tiny_copy / "model_index.json").write_text("{ this is not json")
    assert "cannot load the pipeline" in one_line_error(load_model, str(tiny_copy))


def test_hub_id_not_in_cache_offline():
    message = one_line_error(load_model, "crdiff-tests/definitely-not-cached-model")
    assert "crdiff-tests/definitely-not-cached-model" in message
    assert "HF_HUB_OFFLINE" in message and "not found" in message


def test_corrupt_safetensors_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    message = one_line_error(load_model, str(bad))
    assert "not a readable safetensors file" in message


def test_ckpt_file_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    message = one_line_error(load_model, str(ckpt))
    assert ".ckpt" in message and "safetensors" in message


def test_unrecognised_single_file_checkpoint(tmp_path):
    """A readable .safetensors that is not an SD checkpoint: the real single-file path fails cleanly offline."""
    path = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(4, 4)}, str(path))
    assert "cannot load single-file checkpoint" in one_line_error(load_model, str(path))


# --- a folder written by `crdiff prune` ---------------------------------------------------------------

def test_pruned_folder_loads_back_with_family(tmp_path, load_tiny):
    from typer.testing import CliRunner

    from crdiff_cli.cli import app

    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", "--model", "tiny", "--ratios", "0.3/0.4/0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / PRUNE_RECORD).read_text())
    assert record["family"] == "sd15"

    loaded = load_model(str(out))
    assert loaded.family == "sd15"  # from crdiff_prune.json: the tiny UNet's config alone says "unknown"
    assert detect_family(loaded.unet.config) == "unknown"
    expected = load_tiny("tiny")
    prune_(expected.unet, PruneSpec.from_unet(expected.unet, Ratios(0.3, 0.4, 0.5)))
    assert_same_tensors(loaded.unet.state_dict(), expected.unet.state_dict())
    assert_same_tensors(loaded.pipe.vae.state_dict(), expected.pipe.vae.state_dict())

    # a record with a bad family is ignored rather than trusted
    (out / PRUNE_RECORD).write_text(json.dumps({**record, "family": "sd99"}))
    assert load_model(str(out)).family == "unknown"
