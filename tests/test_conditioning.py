"""ControlNet, img2img, inpainting and the no-CFG (few-step) path, against diffusers' own pipelines.

k = 0 must be diffusers' pipeline bit for bit; k = 1 must be the same pipeline around a UNet pruned in
place (so the ControlNet residuals reach the pruned branch); with POA the ControlNet runs once per step.
The ControlNets are built with ``ControlNetModel.from_unet`` from the tiny UNets, their zero-initialised
output convolutions filled with seeded noise so that their residuals really change the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crdiff_cli.dual.apply import apply_crdiff
from crdiff_cli.dual.unet import DualUNet
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.conditioning import ImageInputs, check_controlnet_fits
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pipelines.loading import load_model
from crdiff_cli.pipelines.schedulers import set_scheduler
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec, prune_
from helpers import invoke, ok

RATIOS = "0.3/0.25/0.35"
RES = Resolution(64, 48)  # HEIGHTxWIDTH
PROMPT, SEED = "a lighthouse", 4


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def random_png(path: Path, seed: int, size=(80, 56)) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def resized(path: Path) -> Image.Image:
    """The test's own resizing to RES (what the oracle pipelines are given)."""
    return Image.open(path).convert("RGB").resize((RES.width, RES.height), Image.Resampling.LANCZOS)


@pytest.fixture(scope="session")
def files(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """A ControlNet per tiny model (``cn-tiny``, ``cn-tiny-sdxl``), a control, an init and a mask image."""
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("conditioning")
    out = {}
    for seed, name in enumerate(("tiny", "tiny-sdxl")):
        controlnet = ControlNetModel.from_unet(load_model(name).unet)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in controlnet.named_parameters():
                if pname.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                     "controlnet_cond_embedding.conv_out")):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        controlnet.save_pretrained(root / f"cn-{name}", safe_serialization=True)
        out[f"cn-{name}"] = root / f"cn-{name}"
    out["control"] = random_png(root / "control.png", 1)
    out["init"] = random_png(root / "init.png", 2)
    mask = np.zeros((56, 80), dtype=np.uint8)
    mask[10:40, 20:60] = 255
    Image.fromarray(mask).save(root / "mask.png")
    out["mask"] = root / "mask.png"
    return out


def oracle(name: str, kind: str, files, **call) -> np.ndarray:
    """diffusers' own pipeline of ``kind`` built from a freshly loaded tiny model, one image."""
    import diffusers
    from diffusers import ControlNetModel

    base = load_model(name).pipe
    xl = "XL" if name == "tiny-sdxl" else ""
    cls = getattr(diffusers, {"controlnet": f"StableDiffusion{xl}ControlNetPipeline",
                              "img2img": f"StableDiffusion{xl}Img2ImgPipeline",
                              "inpaint": f"StableDiffusion{xl}InpaintPipeline"}[kind])
    extra = {"controlnet": ControlNetModel.from_pretrained(files[f"cn-{name}"])} if kind == "controlnet" else {}
    pipe = cls(**base.components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(SEED), **call).images[0])


def generate(tmp_path: Path, name: str, *args) -> np.ndarray:
    ok(invoke("generate", "--model", name, "--res", str(RES), "--steps", "2", "--prompt", PROMPT, "--seed", SEED,
              "--ratios", RATIOS, "--out", tmp_path / "o", *args))
    return pixels(tmp_path / "o" / f"0_{SEED}.png")


# --- k = 0 is diffusers' own pipeline -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_controlnet_k0_equals_the_diffusers_controlnet_pipeline(tmp_path, files, name):
    got = generate(tmp_path, name, "--k", "0", "--controlnet", files[f"cn-{name}"], "--control-image",
                   files["control"], "--control-scale", "0.7")
    want = oracle(name, "controlnet", files, image=resized(files["control"]), controlnet_conditioning_scale=0.7,
                  height=RES.height, width=RES.width)
    assert np.array_equal(got, want)
    plain = oracle(name, "controlnet", files, image=resized(files["control"]), controlnet_conditioning_scale=0.0,
                   height=RES.height, width=RES.width)
    assert np.abs(plain.astype(int) - want).max() > 2  # the ControlNet really conditions the image
    params = json.loads((tmp_path / "o" / "manifest.json").read_text())["images"][0]["params"]
    assert params["controlnet"] == str(files[f"cn-{name}"]) and params["control_scale"] == 0.7


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_img2img_k0_equals_the_diffusers_img2img_pipeline(tmp_path, files, name):
    got = generate(tmp_path, name, "--k", "0", "--init-image", files["init"], "--strength", "0.6")
    assert got.shape == (RES.height, RES.width, 3)
    assert np.array_equal(got, oracle(name, "img2img", files, image=resized(files["init"]), strength=0.6))


def test_inpainting_k0_equals_the_diffusers_inpaint_pipeline(tmp_path, files):
    got = generate(tmp_path, "tiny", "--k", "0", "--init-image", files["init"], "--mask-image", files["mask"],
                   "--strength", "1")
    want = oracle("tiny", "inpaint", files, image=resized(files["init"]), mask_image=resized(files["mask"]),
                  strength=1.0, height=RES.height, width=RES.width)
    assert np.array_equal(got, want)


# --- the dual UNet inside the conditioned pipelines -----------------------------------------------------

def conditioned(name: str, inputs: ImageInputs):
    loaded = load_model(name)
    inputs.check(name)
    loaded.pipe = inputs.pipeline(loaded.pipe)
    return loaded


@pytest.mark.parametrize("kind", ["controlnet", "img2img"])
def test_k1_is_the_pipeline_around_the_pruned_unet(files, kind):
    inputs = (ImageInputs(str(files["cn-tiny"]), files["control"], 0.8) if kind == "controlnet"
              else ImageInputs(init_image=files["init"], strength=0.7))
    settings = GenerationSettings(RES, steps=2, inputs=inputs)
    dual_model = conditioned("tiny", inputs)
    spec = PruneSpec.from_unet(dual_model.unet, Ratios.parse(RATIOS))
    apply_crdiff(dual_model.pipe, spec, k=1.0)
    pruned_model = conditioned("tiny", inputs)
    prune_(pruned_model.unet, spec)
    got = np.asarray(generate_image(dual_model.pipe, PROMPT, SEED, settings))
    assert np.array_equal(got, np.asarray(generate_image(pruned_model.pipe, PROMPT, SEED, settings)))


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_controlnet_runs_once_per_step_for_both_branches(files, name):
    inputs = ImageInputs(str(files[f"cn-{name}"]), files["control"])
    loaded = conditioned(name, inputs)
    dual = apply_crdiff(loaded.pipe, PruneSpec.from_unet(loaded.unet, Ratios.parse(RATIOS)), k=1.5)
    calls = {"controlnet": [], "unet": []}
    for key, module in (("controlnet", loaded.pipe.controlnet), ("unet", dual.unet)):
        module.register_forward_pre_hook(lambda m, args, kwargs, key=key: calls[key].append(kwargs), with_kwargs=True)
    set_scheduler(loaded.pipe, "ddim")
    generate_image(loaded.pipe, PROMPT, SEED, GenerationSettings(RES, steps=3, inputs=inputs))
    assert len(calls["controlnet"]) == 3 and len(calls["unet"]) == 6  # one ControlNet pass, two UNet passes
    for dense, pruned in zip(calls["unet"][::2], calls["unet"][1::2]):
        residuals = dense["down_block_additional_residuals"]
        assert len(residuals) > 0 and len(residuals) == len(pruned["down_block_additional_residuals"])
        assert all(a is b for a, b in zip(residuals, pruned["down_block_additional_residuals"]))  # the same tensors
        assert dense["mid_block_additional_residual"] is pruned["mid_block_additional_residual"]


def test_both_branches_get_their_own_copy_of_list_residuals(tiny_readonly):
    """T2I-Adapter residuals arrive as a list the UNet pops from: the pruned pass must still see all of them."""
    unet = tiny_readonly["tiny"].unet
    spec = PruneSpec.from_unet(unet, Ratios.parse(RATIOS))
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    residuals = [torch.randn(1, 32, 8, 8, generator=gen), torch.randn(1, 64, 4, 4, generator=gen)]
    with torch.no_grad():
        dense = unet(sample, 5, text, down_intrablock_additional_residuals=list(residuals)).sample
        dual = DualUNet(unet, spec, k=1.0)
        try:
            pruned = dual(sample, 5, text, down_intrablock_additional_residuals=list(residuals)).sample
            dual.k = 1.5
            both = dual(sample, 5, text, down_intrablock_additional_residuals=list(residuals)).sample
        finally:
            dual.release()
    assert torch.equal(both, torch.lerp(dense, pruned, 1.5))


# --- few-step distilled models: no CFG ------------------------------------------------------------------

@pytest.mark.parametrize("name, scheduler", [("tiny", "lcm"), ("tiny-sdxl", "euler-trailing")])
def test_guidance_1_runs_one_batch_half_and_k0_equals_diffusers(tmp_path, tiny_dirs, name, scheduler):
    got = generate(tmp_path, name, "--k", "0", "--guidance", "1", "--scheduler", scheduler)
    base = load_model(name).pipe
    import diffusers

    cls, options = {"lcm": ("LCMScheduler", {}),
                    "euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})}[scheduler]
    base.scheduler = getattr(diffusers, cls).from_config(base.scheduler.config, **options)
    want = base(PROMPT, height=RES.height, width=RES.width, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.array_equal(got, np.asarray(want))

    loaded = load_model(name)
    dual = apply_crdiff(loaded.pipe, PruneSpec.from_unet(loaded.unet, Ratios.parse(RATIOS)), k=1.5)
    batches = []
    dual.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    set_scheduler(loaded.pipe, scheduler)
    generate_image(loaded.pipe, PROMPT, SEED, GenerationSettings(RES, steps=2, guidance=1.0))
    assert batches == [1] * 4  # 2 steps x (dense + pruned pass), each one batch half
    batches.clear()
    generate_image(loaded.pipe, PROMPT, SEED, GenerationSettings(RES, steps=2, guidance=5.0))
    assert batches == [2] * 4  # with guidance, both halves


# --- bad input -------------------------------------------------------------------------------------------

def bad_case(tmp_path: Path, files, case: str) -> tuple[list, str]:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return {
        "control image without controlnet": (["--control-image", files["control"]], "--control-image needs"),
        "controlnet without control image": (["--controlnet", files["cn-tiny"]], "needs --control-image"),
        "unreadable control image": (["--controlnet", files["cn-tiny"], "--control-image", text], "not a readable image"),
        "missing control image": (["--controlnet", files["cn-tiny"], "--control-image", tmp_path / "no.png"],
                                  "does not exist"),
        "negative control scale": (["--controlnet", files["cn-tiny"], "--control-image", files["control"],
                                    "--control-scale", "-1"], ">= 0"),
        "controlnet of another model": (["--controlnet", files["cn-tiny-sdxl"], "--control-image", files["control"]],
                                        "does not match this UNet"),
        "missing controlnet": (["--controlnet", tmp_path / "nope", "--control-image", files["control"]],
                               "does not exist"),
        "not a controlnet": (["--controlnet", files["cn-tiny"].parent / "unet-like", "--control-image",
                              files["control"]], "not a ControlNetModel"),
        "strength 0": (["--init-image", files["init"], "--strength", "0"], "(0, 1]"),
        "strength above 1": (["--init-image", files["init"], "--strength", "1.5"], "(0, 1]"),
        "strength nan": (["--init-image", files["init"], "--strength", "nan"], "--strength nan must be a finite number"),
        "strength without init image": (["--strength", "0.5"], "need --init-image"),
        "mask without init image": (["--mask-image", files["mask"]], "need --init-image"),
        "unreadable init image": (["--init-image", text], "not a readable image"),
    }[case]


BAD = ["control image without controlnet", "controlnet without control image", "unreadable control image",
       "missing control image", "negative control scale", "controlnet of another model", "missing controlnet",
       "not a controlnet", "strength 0", "strength above 1", "strength nan", "strength without init image",
       "mask without init image", "unreadable init image"]


@pytest.mark.parametrize("case", BAD)
def test_bad_conditioning_is_one_line_exit_2_before_loading_and_writes_nothing(tmp_path, files, monkeypatch, case):
    import crdiff_cli.pipelines.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(crdiff_cli.pipelines.loading, "load_model", no_loading)
    unet_like = files["cn-tiny"].parent / "unet-like"
    if not unet_like.exists():
        unet_like.mkdir()
        (unet_like / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    args, message = bad_case(tmp_path, files, case)
    result = invoke("generate", "--model", "tiny", "--res", "64x64", "--prompt", "x", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_controlnet_checks_that_need_the_loaded_model_or_an_artifact(files, tiny_readonly):
    sdxl_config = json.loads((files["cn-tiny-sdxl"] / "config.json").read_text())
    with pytest.raises(CrdiffError, match="does not match this UNet"):  # a hub ControlNet, checked once loaded
        check_controlnet_fits(sdxl_config, tiny_readonly["tiny"].unet.config, "some/controlnet")
    with pytest.raises(CrdiffError, match=r"\.onnx artifact"):
        ImageInputs(str(files["cn-tiny"]), files["control"]).check("tiny", onnx=True)


def test_ip_adapter_projections_live_in_attn2_and_are_never_targets(tiny_dirs):
    """diffusers' IP-Adapter processors go on the cross-attention (attn2) processors only: targets, thresholds
    unchanged, and image embeddings reach both dual branches."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    from crdiff_cli.pruning.targets import target_weights

    unet = load_model("tiny").unet
    before = {g: [(n, p.numel()) for n, p in ws] for g, ws in target_weights(unet).items()}
    spec = PruneSpec.from_unet(unet, Ratios.parse(RATIOS))
    torch.manual_seed(3)
    processors = {}
    for name in unet.attn_processors:  # what diffusers' _convert_ip_adapter_attn_to_diffusers installs
        attention = unet.get_submodule(name.removesuffix(".processor"))
        processors[name] = AttnProcessor2_0() if name.endswith("attn1.processor") else IPAdapterAttnProcessor2_0(
            hidden_size=attention.to_q.out_features, cross_attention_dim=32, num_tokens=(4,))
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(16, 32, num_image_text_embeds=4)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    ip_params = [n for n, _ in unet.named_parameters() if "_ip." in n]
    assert ip_params and all(".attn2.processor.to_" in n for n in ip_params)
    assert {g: [(n, p.numel()) for n, p in ws] for g, ws in target_weights(unet).items()} == before
    assert PruneSpec.from_unet(unet, Ratios.parse(RATIOS)) == spec
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    image_embeds = [torch.randn(1, 1, 16, generator=gen)]
    dual = DualUNet(unet, spec, k=1.0)
    with torch.no_grad():
        try:
            outputs = {}
            for k in (0.0, 1.0, 1.5):
                dual.k = k
                outputs[k] = dual(sample, 5, text, added_cond_kwargs={"image_embeds": image_embeds}).sample
        finally:
            dual.release()
        without = unet(sample, 5, text, added_cond_kwargs={"image_embeds": [torch.zeros(1, 1, 16)]}).sample
    assert torch.equal(outputs[1.5], torch.lerp(outputs[0.0], outputs[1.0], 1.5))
    assert not torch.equal(outputs[0.0], without)  # the image prompt really enters the UNet
