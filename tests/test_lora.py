"""LoRA: adapter layers are never targets, and `--lora` means "prune / generate the LoRA-fused model".

Oracles: diffusers' own loader and ``fuse_lora`` (then ``unload_lora_weights``), a plain-torch prune by
the definition (written here from docs/method.md, sharing no code with crdiff_cli), and diffusers' own
LoRA pipeline output. The LoRA is built with peft on the tiny UNet (random, non-zero B matrices) and
saved with diffusers' ``save_lora_weights``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crdiff_cli.dual.apply import apply_crdiff
from crdiff_cli.dual.unet import DualUNet
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pipelines.loading import load_model
from crdiff_cli.pipelines.lora import parse_lora
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.pruning.targets import target_weights
from helpers import invoke, ok

RATIOS = "0.3/0.25/0.35"
LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in"]


def save_lora(pipe, folder: Path, seed: int) -> Path:
    """A rank-4 LoRA with seeded non-zero weights on ``pipe``'s UNet, saved by diffusers; returns the file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_MODULES))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def loras(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """``{"tiny": file, "tiny-sdxl": file}``: one LoRA per tiny model."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for seed, name in enumerate(("tiny", "tiny-sdxl")):
        (root / name).mkdir()
        out[name] = save_lora(load_model(name).pipe, root / name, seed)
    return out


def diffusers_fused(name: str, lora: Path, scale: float, unload: bool = True):
    """The oracle: diffusers loads the LoRA, fuses it at ``scale`` and (optionally) drops the adapter layers."""
    pipe = load_model(name).pipe
    pipe.load_lora_weights(str(lora.parent))
    pipe.fuse_lora(lora_scale=scale)
    if unload:
        pipe.unload_lora_weights()
    return pipe


def reference_prune(unet, ratios: tuple[float, float, float]) -> None:
    """The pruning rule by the definition, on a plain UNet: per group kthvalue over the concatenated |w|."""
    groups = {"down_blocks": [], "mid_block": [], "up_blocks": []}
    for name, module in unet.named_modules():
        prefix = name.split(".", 1)[0]
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and prefix in groups \
                and ("attn" in name or "ff" in name) and "attn2" not in name:
            groups[prefix].append(module.weight)
    with torch.no_grad():
        for weights, r in zip(groups.values(), ratios):
            m = math.floor(sum(w.numel() for w in weights) * r)
            if m:
                t = torch.cat([w.abs().flatten() for w in weights]).kthvalue(m).values
                for w in weights:
                    w[w.abs() <= t] = 0


# --- the target rule with adapters attached ---------------------------------------------------------

def test_unfused_adapter_is_refused_everywhere_with_the_fuse_hint(tiny_dirs, loras):
    pipe = load_model("tiny").pipe
    pipe.load_lora_weights(str(loras["tiny"].parent))
    for build in (lambda: target_weights(pipe.unet), lambda: PruneSpec.from_unet(pipe.unet, Ratios(0.3, 0.3, 0.3))):
        with pytest.raises(CrdiffError, match=r"unfused adapter.*pipe\.fuse_lora\(\)"):
            build()
    plain_spec = PruneSpec.from_unet(load_model("tiny").unet, Ratios(0.3, 0.3, 0.3))
    with pytest.raises(CrdiffError, match="fuse_lora"):
        DualUNet(pipe.unet, plain_spec)


def test_fused_adapter_layers_give_exactly_the_fused_models_targets_spec_and_outputs(tiny_dirs, loras):
    wrapped = diffusers_fused("tiny", loras["tiny"], 0.7, unload=False).unet  # PEFT layers kept, merged
    plain = diffusers_fused("tiny", loras["tiny"], 0.7).unet
    assert any("lora_A" in n for n, _ in wrapped.named_modules())  # the adapter layers are really there
    found, expected = target_weights(wrapped), target_weights(plain)
    for group in found:
        names = [n for n, _ in found[group]]
        assert all("lora_" not in n and "magnitude" not in n for n in names)
        assert [n.replace(".base_layer", "") for n in names] == [n for n, _ in expected[group]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(found[group], expected[group]))
    ratios = Ratios.parse(RATIOS)
    spec = PruneSpec.from_unet(wrapped, ratios)
    assert spec == PruneSpec.from_unet(plain, ratios)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    outputs = []
    for unet in (wrapped, plain):
        dual = DualUNet(unet, spec, k=1.5)
        with torch.no_grad():
            outputs.append(dual(sample, 10, text).sample)
        dual.release()
    assert torch.equal(*outputs)


def test_bake_refuses_a_unet_with_adapter_layers(tmp_path, tiny_dirs, loras):
    from crdiff_cli.exporters.bake import bake

    wrapped = diffusers_fused("tiny", loras["tiny"], 1.0, unload=False).unet
    spec = PruneSpec.from_unet(wrapped, Ratios(0.3, 0.3, 0.3))
    with pytest.raises(CrdiffError, match=r"pipe\.unload_lora_weights\(\)"):
        bake(wrapped, spec, k=1.5, resolution=Resolution(64, 64), family="sd15", out=tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- --lora on the commands --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_prune_with_lora_equals_pruning_the_diffusers_fused_model(tmp_path, tiny_dirs, loras, name):
    ok(invoke("prune", "--model", name, "--lora", f"{loras[name]}:0.7", "--ratios", RATIOS, "--out", tmp_path / "p"))
    oracle = diffusers_fused(name, loras[name], 0.7)
    reference_prune(oracle.unet, Ratios.parse(RATIOS).as_tuple())
    pruned = load_model(str(tmp_path / "p")).pipe
    got, want = pruned.unet.state_dict(), oracle.unet.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)) for k in want)
    record = json.loads((tmp_path / "p" / "crdiff_prune.json").read_text())
    assert record["loras"] == [f"{loras[name].resolve()}:0.7"]


def test_two_loras_are_fused_in_order_with_their_scales(tmp_path, tiny_dirs, loras):
    other = tmp_path / "other"
    other.mkdir()
    second = save_lora(load_model("tiny").pipe, other, seed=7)
    ok(invoke("prune", "--model", "tiny", "--lora", loras["tiny"], "--lora", f"{other}:-0.5", "--ratios", RATIOS,
              "--unet-only", "--out", tmp_path / "p"))
    oracle = diffusers_fused("tiny", loras["tiny"], 1.0)
    oracle.load_lora_weights(str(second.parent))
    oracle.fuse_lora(lora_scale=-0.5)
    oracle.unload_lora_weights()
    reference_prune(oracle.unet, Ratios.parse(RATIOS).as_tuple())
    from diffusers import UNet2DConditionModel

    got = UNet2DConditionModel.from_pretrained(tmp_path / "p").state_dict()
    assert all(torch.equal(got[k], v) for k, v in oracle.unet.state_dict().items())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_k0_with_lora_equals_the_diffusers_lora_pipeline(tmp_path, tiny_dirs, loras):
    ok(invoke("generate", "--model", "tiny", "--lora", f"{loras['tiny']}:0.8", "--k", "0", "--ratios", RATIOS,
              "--res", "64x48", "--steps", "2", "--prompt", "a fox", "--seed", "3", "--out", tmp_path / "o"))
    settings = GenerationSettings(Resolution(64, 48), steps=2)
    fused = np.asarray(generate_image(diffusers_fused("tiny", loras["tiny"], 0.8, unload=False), "a fox", 3, settings))
    assert np.array_equal(pixels(tmp_path / "o" / "0_3.png"), fused)
    unfused = load_model("tiny").pipe  # the adapter applied on the fly: W x + s B A x, equal up to rounding
    unfused.load_lora_weights(str(loras["tiny"].parent))
    unfused.set_adapters(unfused.get_active_adapters(), 0.8)
    on_the_fly = np.asarray(generate_image(unfused, "a fox", 3, settings)).astype(int)
    assert np.abs(on_the_fly - fused).max() <= 2
    no_lora = np.asarray(generate_image(load_model("tiny").pipe, "a fox", 3, settings)).astype(int)
    assert np.abs(no_lora - fused).max() > 2  # the LoRA really changes the image
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["images"][0]["params"]["loras"] == [f"{loras['tiny'].resolve()}:0.8"]


def test_generate_crdiff_with_lora_equals_a_dual_unet_over_the_diffusers_fused_model(tmp_path, tiny_dirs, loras):
    ok(invoke("generate", "--model", "tiny-sdxl", "--lora", loras["tiny-sdxl"], "--k", "1.5", "--ratios", RATIOS,
              "--res", "64x64", "--steps", "2", "--prompt", "a fox", "--out", tmp_path / "o"))

    class Loaded:
        pipe = diffusers_fused("tiny-sdxl", loras["tiny-sdxl"], 1.0)

    apply_crdiff(Loaded.pipe, PruneSpec.from_unet(Loaded.pipe.unet, Ratios.parse(RATIOS)), k=1.5)
    expected = generate_image(Loaded.pipe, "a fox", 0, GenerationSettings(Resolution(64, 64), steps=2))
    assert np.array_equal(pixels(tmp_path / "o" / "0_0.png"), np.asarray(expected))


def test_bake_with_lora_stores_the_fused_unet(tmp_path, tiny_dirs, loras):
    from crdiff_cli.exporters.safetensors_artifact import load_safetensors_unet

    ok(invoke("bake", "--model", "tiny", "--lora", f"{loras['tiny']}:0.5", "--res", "64x64", "--ratios", RATIOS,
              "--out", tmp_path / "a.safetensors"))
    unet, meta = load_safetensors_unet(tmp_path / "a.safetensors")
    fused = diffusers_fused("tiny", loras["tiny"], 0.5).unet
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in fused.state_dict().items())
    assert meta.spec == PruneSpec.from_unet(fused, Ratios.parse(RATIOS))


def test_search_with_lora_records_it_in_the_journal_identity(tmp_path, tiny_dirs, loras):
    args = ["search", "--model", "tiny", "--res", "64x64", "--scorer", "tiny", "--steps", "1", "--iters", "1",
            "--prompt", "a cube", "--out", tmp_path / "best.json"]
    ok(invoke(*args, "--lora", f"{loras['tiny']}:0.5"))
    header = json.loads((tmp_path / "best.journal.jsonl").read_text().splitlines()[0])
    assert header["identity"]["model"] == f"tiny + lora {loras['tiny'].resolve()}:0.5"
    changed = invoke(*args, "--lora", f"{loras['tiny']}:0.6", "--resume")
    assert changed.exit_code == 2 and "model" in changed.stderr


# --- bad input ------------------------------------------------------------------------------------------

def bad_lora(tmp_path: Path, loras: dict, case: str) -> str:
    if case == "missing":
        return str(tmp_path / "nope.safetensors")
    if case == "pickled":
        (tmp_path / "lora.pt").write_bytes(b"\x80\x04K\x01.")
        return str(tmp_path / "lora.pt")
    if case == "pickled folder":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04K\x01.")
        return str(tmp_path / "folder")
    if case == "corrupt":
        (tmp_path / "bad.safetensors").write_bytes(loras["tiny"].read_bytes()[:200])
        return str(tmp_path / "bad.safetensors")
    if case == "not a lora":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        return str(tmp_path / "w.safetensors")
    if case == "sdxl lora on sd15":
        return str(loras["tiny-sdxl"])
    if case == "bad scale":
        return f"{loras['tiny']}:nan"
    raise AssertionError(case)


LORA_CASES = {"missing": "does not exist", "pickled": "pickle", "pickled folder": "pickled",
              "corrupt": "not a readable safetensors", "not a lora": "no LoRA weights",
              "sdxl lora on sd15": "64-wide text conditioning", "bad scale": "finite"}


@pytest.mark.parametrize("command", ["prune", "generate", "search", "bake", "evaluate"])
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_bad_lora_is_one_line_exit_2_before_loading_and_writes_nothing(tmp_path, tiny_dirs, loras, monkeypatch,
                                                                       command, case):
    import crdiff_cli.pipelines.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the LoRA was checked")

    monkeypatch.setattr(crdiff_cli.pipelines.loading, "load_model", no_loading)
    out = tmp_path / "out"
    args = {"prune": ["--ratios", RATIOS, "--out", out],
            "generate": ["--res", "64x64", "--prompt", "x", "--out", out],
            "search": ["--res", "64x64", "--scorer", "tiny", "--prompt", "x", "--out", out / "p.json"],
            "bake": ["--res", "64x64", "--out", out / "a.safetensors"],
            "evaluate": ["--res", "64x64", "--prompt", "x", "--metrics", "tiny", "--out", out]}[command]
    if command in ("search", "bake"):
        out.mkdir()
    lora = bad_lora(tmp_path, loras, case)
    before = sorted(tmp_path.rglob("*"))
    result = invoke(command, "--model", "tiny", "--lora", lora, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and LORA_CASES[case] in lines[0], result.stderr
    after = sorted(tmp_path.rglob("*"))
    assert after == before


def test_lora_that_does_not_fit_a_model_without_a_readable_config_fails_at_load(tiny_dirs, loras):
    from crdiff_cli.pipelines.lora import fuse_loras

    pipe = load_model("tiny").pipe
    with pytest.raises(CrdiffError, match="does not fit this model"):
        fuse_loras(pipe, [parse_lora(str(loras["tiny-sdxl"]))])
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())  # nothing half-loaded is left behind


def test_parse_lora_scale_and_paths_with_colons(tmp_path, loras):
    assert parse_lora(f"{loras['tiny']}:0.25").scale == 0.25
    assert parse_lora(str(loras["tiny"])).scale == 1.0
    assert parse_lora(str(loras["tiny"].parent)).path == loras["tiny"]  # a folder holding one file
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(loras["tiny"].read_bytes())
    assert parse_lora(str(odd)).path == odd
    with pytest.raises(CrdiffError, match=r"the scale 'abc' is not a number; write PATH:SCALE"):
        parse_lora(f"{loras['tiny']}:abc")  # not "does not exist": the file is there, the scale is wrong
