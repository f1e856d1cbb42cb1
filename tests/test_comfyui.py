"""The CR-Diff nodes inside real ComfyUI: a seeded SD15-detected checkpoint through the real KSampler, in-process
and through ComfyUI's server.

This tier needs a ComfyUI checkout and a Python that runs it (ComfyUI is not a package: docs/comfyui.md,
"Testing"): ``COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_comfyui.py``.
Without ``COMFYUI_DIR`` it is skipped. Oracles: the plain model through the same workflow (k = 0 must give its
latents bit for bit), a copy of the UNet pruned by crdiff's own ``prune_`` (one model call must be
``lerp(dense, pruned, k)``), and crdiff's thresholds on the same weights converted to diffusers' names.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="the ComfyUI tier needs COMFYUI_DIR (a ComfyUI checkout) and "
                                "that ComfyUI's Python: see docs/comfyui.md, Testing")
RATIOS = (0.3, 0.2, 0.25)
SIZE = (96, 64)  # width, height: a non-square size
CUSTOM = "custom ratios (down / mid / up)"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI imported in-process on the CPU, with the tiny checkpoint, a ControlNet and a LoRA in its folders."""
    sys.path.insert(0, COMFYUI_DIR)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    importlib.import_module("utils.extra_config")  # before nodes: ComfyUI's own import order
    import folder_paths
    import nodes

    from comfyui_models import build_checkpoint

    models = tmp_path_factory.mktemp("comfy-models")
    for kind in ("checkpoints", "controlnet", "loras", "diffusion_models"):
        (models / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(models / kind))
    build_checkpoint(models / "checkpoints" / "tiny_sd15.safetensors")
    return nodes, models


@pytest.fixture(scope="module")
def loaded(comfy):
    nodes, _ = comfy
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")
        positive = nodes.CLIPTextEncode().encode(clip, "a lighthouse at dusk")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, clip, vae, positive, negative


def sample(comfy, loaded, model, steps: int = 3, sampler: str = "euler", scheduler: str = "normal", positive=None,
           negative=None) -> torch.Tensor:
    nodes, _ = comfy
    _, _, _, pos, neg = loaded
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(*SIZE, 1)[0]
        out = nodes.KSampler().sample(model, 7, steps, 5.0, sampler, scheduler, positive or pos, negative or neg, latent)
    return out[0]["samples"]


def crdiff(model, k: float, ratios=RATIOS, masks: str = "on-the-fly", ratios_from: str = CUSTOM, profile_file: str = ""):
    from crdiff_cli.comfyui.nodes import CRDiff

    with torch.inference_mode():
        return CRDiff().patch(model, ratios_from, *ratios, k, masks, profile_file)[0]


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_k0_and_zero_ratios_give_the_plain_models_latents_bit_for_bit(comfy, loaded, sampler, scheduler):
    from crdiff_cli.comfyui.nodes import patch_of

    model = loaded[0]
    plain = sample(comfy, loaded, model, sampler=sampler, scheduler=scheduler)
    forced = crdiff(model, 0.0)
    patch_of(forced).skip_single_branch = False  # both passes run, lerp at k = 0 must return the dense one
    for patched in (crdiff(model, 0.0), forced, crdiff(model, 1.5, ratios=(0.0, 0.0, 0.0))):
        assert torch.equal(sample(comfy, loaded, patched, sampler=sampler, scheduler=scheduler), plain)
    assert not torch.equal(sample(comfy, loaded, crdiff(model, 1.5), sampler=sampler, scheduler=scheduler), plain)


@pytest.mark.parametrize("masks", ["on-the-fly", "copy"])
def test_one_model_call_is_dense_plus_k_times_pruned_minus_dense(comfy, loaded, masks):
    from comfy.patcher_extension import WrappersMP

    from crdiff_cli.comfyui.ldm_targets import ldm_target
    from crdiff_cli.comfyui.nodes import patch_of
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.spec import PruneSpec, prune_

    model = loaded[0]
    calls = []

    def record(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        calls.append((x.clone(), timesteps.clone(), context.clone(), out.clone()))
        return out

    recorded = model.clone()
    recorded.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "record", record)  # outside CR-Diff's wrapper
    patched = crdiff(recorded, 1.3, masks=masks)
    sample(comfy, loaded, patched, steps=1)
    x, timesteps, context, out = calls[0]
    with torch.inference_mode():
        unet = model.model.diffusion_model
        dense_unet = copy.deepcopy(unet)
        spec = PruneSpec.from_unet(dense_unet, Ratios(*RATIOS), target_filter=ldm_target)
        pruned_unet = prune_(copy.deepcopy(unet), spec)
        dense, pruned = dense_unet(x, timesteps, context), pruned_unet(x, timesteps, context)
    assert spec.thresholds() == patch_of(patched).spec.thresholds()
    assert torch.equal(out, torch.lerp(dense, pruned, 1.3))  # bit for bit: the same kernels on the same weights
    assert (pruned - dense).abs().max() > 1e-3 * out.abs().max()  # the two passes really differ


def test_thresholds_equal_crdiffs_on_the_same_unet_under_diffusers_names(comfy, loaded):
    from comfy.utils import unet_to_diffusers
    from diffusers import UNet2DConditionModel

    from crdiff_cli.comfyui.nodes import patch_of
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.spec import PruneSpec

    model = loaded[0]
    patched = crdiff(model, 1.5)
    sample(comfy, loaded, patched, steps=1)
    mapping = unet_to_diffusers(model.model.model_config.unet_config)  # diffusers name -> LDM name
    ldm = model.model.diffusion_model.state_dict()
    diffusers_unet = UNet2DConditionModel(
        block_out_channels=(320, 320), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    state = {name: ldm[key] for name, key in mapping.items() if key in ldm}
    missing, unexpected = diffusers_unet.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    expected = PruneSpec.from_unet(diffusers_unet, Ratios(*RATIOS))
    assert patch_of(patched).spec.thresholds() == expected.thresholds()
    assert patch_of(patched).spec.groups == expected.groups


def test_the_plain_model_is_unchanged_and_a_lora_upstream_changes_the_thresholds(comfy, loaded):
    from comfyui_models import build_lora
    from crdiff_cli.comfyui.ldm_targets import PREFIX, ldm_target
    from crdiff_cli.comfyui.nodes import patch_of
    from crdiff_cli.pruning.targets import target_weights

    nodes, models = comfy
    model = loaded[0]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    plain = sample(comfy, loaded, model)
    patched = crdiff(model, 1.5)
    sample(comfy, loaded, patched)
    assert torch.equal(sample(comfy, loaded, model), plain)
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())

    down = target_weights(model.model.diffusion_model, ldm_target)["down"][:2]
    build_lora(models / "loras" / "tiny_lora.safetensors", [(PREFIX + name, tuple(w.shape)) for name, w in down])
    with torch.inference_mode():
        with_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny_lora.safetensors", 1.0)[0]
    patched_lora = crdiff(with_lora, 1.5)
    sample(comfy, loaded, patched_lora)
    plain_t, lora_t = patch_of(patched).spec.thresholds(), patch_of(patched_lora).spec.thresholds()
    assert lora_t["down"] != plain_t["down"] and (lora_t["mid"], lora_t["up"]) == (plain_t["mid"], plain_t["up"])
    assert torch.equal(sample(comfy, loaded, model), plain)  # the LoRA run did not leak into the plain model


def test_controlnet_runs_and_k0_equals_the_plain_controlnet_run(comfy, loaded):
    from comfyui_models import build_controlnet

    nodes, models = comfy
    model, _, vae, positive, negative = loaded
    build_controlnet(models / "controlnet" / "tiny_cn.safetensors", model.model.diffusion_model.state_dict())
    hint = torch.rand(1, SIZE[1], SIZE[0], 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        control = nodes.ControlNetLoader().load_controlnet("tiny_cn.safetensors")[0]
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, 1.0, 0.0, 1.0,
                                                                    vae=vae)
    plain = sample(comfy, loaded, model, positive=pos, negative=neg)
    assert not torch.equal(plain, sample(comfy, loaded, model))  # the ControlNet acts
    assert torch.equal(sample(comfy, loaded, crdiff(model, 0.0), positive=pos, negative=neg), plain)
    with_crdiff = sample(comfy, loaded, crdiff(model, 1.5), positive=pos, negative=neg)
    assert torch.isfinite(with_crdiff).all() and not torch.equal(with_crdiff, plain)


def test_an_artifact_reproduces_crdiffs_settings_and_refuses_another_models(comfy, loaded, tmp_path):
    from crdiff_cli.comfyui.nodes import CRDiffFromArtifact, patch_of
    from crdiff_cli.exporters.metadata import ArtifactMetadata
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.pruning.spec import PruneSpec

    model = loaded[0]
    patched = crdiff(model, 1.25)
    expected = sample(comfy, loaded, patched)
    spec = patch_of(patched).spec
    for name, thresholds in (("good", spec.thresholds()), ("other", {g: 0.5 for g in spec.thresholds()})):
        meta = ArtifactMetadata(spec=PruneSpec(spec.ratios, {g: type(s)(s.ratio, s.layers, s.targets, thresholds[g],
                                                                        s.pruned) for g, s in spec.groups.items()},
                                               spec.dtype),
                                k=1.25, resolution=Resolution(64, 96), family="sd15", unet_config={},
                                base_unet_sha256="0" * 64, target_names={})
        import safetensors.torch

        safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / f"{name}.safetensors"),
                                    metadata={"format": "pt", **meta.to_strings()})
    with torch.inference_mode():
        from_artifact = CRDiffFromArtifact().patch(model, str(tmp_path / "good.safetensors"), "on-the-fly")[0]
    assert torch.equal(sample(comfy, loaded, from_artifact), expected)
    assert Ratios(*RATIOS) == patch_of(from_artifact).spec.ratios
    with torch.inference_mode():
        other = CRDiffFromArtifact().patch(model, str(tmp_path / "other.safetensors"), "on-the-fly")[0]
    with pytest.raises(Exception, match="baked from another model"):
        sample(comfy, loaded, other)


@pytest.mark.parametrize("case, message", [
    ("nan k", "k=nan"), ("profile of another family", "is for sdxl models"), ("damaged artifact", "CR-Diff: "),
    ("not a UNet", "not a Stable Diffusion UNet"), ("missing profile file", "CR-Diff: ")])
def test_bad_input_is_one_clear_error(comfy, loaded, tmp_path, case, message):
    from types import SimpleNamespace

    from crdiff_cli.comfyui.nodes import CRDiff, CRDiffFromArtifact

    model = loaded[0]
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    calls = {
        "nan k": lambda: CRDiff().patch(model, CUSTOM, *RATIOS, float("nan"), "on-the-fly"),
        "profile of another family": lambda: CRDiff().patch(model, "sdxl@512x512", *RATIOS, 1.5, "on-the-fly"),
        "damaged artifact": lambda: CRDiffFromArtifact().patch(model, str(tmp_path / "broken.safetensors"), "copy"),
        "not a UNet": lambda: CRDiff().patch(SimpleNamespace(model=SimpleNamespace(
            diffusion_model=torch.nn.Linear(1, 1))), CUSTOM, *RATIOS, 1.5, "on-the-fly"),
        "missing profile file": lambda: CRDiff().patch(model, CUSTOM, *RATIOS, 1.5, "on-the-fly",
                                                       str(tmp_path / "nope.json")),
    }
    with pytest.raises(ValueError, match=message) as info:
        calls[case]()
    assert "\n" not in str(info.value) and str(info.value).startswith("CR-Diff: ")


SD21 = {"context_dim": 1024, "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64}


def test_an_sd21_unet_is_detected_pruned_exactly_and_k0_is_the_plain_model(comfy, loaded):
    """SD2.x's layout (1024-d context, linear projections), loaded as a diffusion model alone (UNETLoader),
    conditioned with seeded embeddings: its family, Table 6's SD2.1 profile, crdiff's thresholds, k = 0."""
    import safetensors.torch
    from comfy.utils import unet_to_diffusers
    from diffusers import UNet2DConditionModel

    from comfyui_models import seeded, unet_module
    from crdiff_cli.comfyui.nodes import AUTO, model_family, patch_of
    from crdiff_cli.pruning.profile_table import choose_ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.pruning.spec import PruneSpec

    nodes, models = comfy
    state = {k: seeded(k, v, 5).contiguous() for k, v in unet_module(SD21).state_dict().items()}
    safetensors.torch.save_file(state, str(models / "diffusion_models" / "tiny_sd21.safetensors"))
    generator = torch.Generator().manual_seed(4)
    positive, negative = ([[torch.randn(1, 77, 1024, generator=generator), {}]] for _ in range(2))
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet("tiny_sd21.safetensors", "default")[0]
    assert model_family(model) == "sd21"
    plain = sample(comfy, loaded, model, positive=positive, negative=negative)
    assert torch.equal(sample(comfy, loaded, crdiff(model, 0.0, ratios_from=AUTO), positive=positive,
                              negative=negative), plain)
    patched = crdiff(model, 1.5, ratios_from=AUTO)
    assert not torch.equal(sample(comfy, loaded, patched, positive=positive, negative=negative), plain)
    spec = patch_of(patched).spec
    assert spec.ratios == choose_ratios("sd21", ratios=None, profile=None, resolution=Resolution(SIZE[1], SIZE[0])).ratios
    mapping = unet_to_diffusers(model.model.model_config.unet_config)
    ldm = model.model.diffusion_model.state_dict()
    diffusers_unet = UNet2DConditionModel(
        block_out_channels=(320, 320), layers_per_block=1, cross_attention_dim=1024, attention_head_dim=5,
        use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    missing, unexpected = diffusers_unet.load_state_dict({n: ldm[k] for n, k in mapping.items() if k in ldm}, strict=False)
    assert not missing and not unexpected
    assert PruneSpec.from_unet(diffusers_unet, spec.ratios).groups == spec.groups


def _post(port: int, path: str, body: dict | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=None if body is None else
                                     json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def workflow(extra_node: dict | None) -> dict:
    """Load -> encode -> KSampler -> decode -> save, with node "9" (CR-Diff) between the model and the sampler."""
    flow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse at dusk"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE[0], "height": SIZE[1], "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["9", 0] if extra_node else ["1", 0], "seed": 7, "steps": 3,
                                                  "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                                                  "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                                                  "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "crdiff"}},
    }
    if extra_node:
        flow["9"] = {"class_type": extra_node.pop("class_type"), "inputs": {"model": ["1", 0], **extra_node}}
    return flow


def test_through_the_server_installed_with_crdiff_comfyui(comfy, tmp_path):
    """The documented install (``crdiff comfyui DIR``) into a ComfyUI base directory, workflows POSTed to /prompt:
    k = 0 gives the plain workflow's image, k = 1.5 another one, bad input is a node error with crdiff's message."""
    _, models = comfy
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "models").mkdir()
    (base / "models" / "checkpoints").symlink_to(models / "checkpoints")
    subprocess.run([sys.executable, "-m", "crdiff_cli", "comfyui", str(base)], check=True, capture_output=True)
    port = 8190 + os.getpid() % 500
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--base-directory", str(base), "--disable-api-nodes", "--disable-metadata"],
                              cwd=COMFYUI_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(240):
            try:
                info = _post(port, "/object_info/CRDiff")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("ComfyUI did not start: " + server.stderr.read1(5000).decode(errors="replace"))
        assert "k" in info["CRDiff"]["input"]["required"]

        def run(extra):
            prompt_id = _post(port, "/prompt", {"prompt": workflow(extra)})["prompt_id"]
            for _ in range(600):
                history = _post(port, f"/history/{prompt_id}").get(prompt_id)
                if history and (history["status"]["completed"] or history["status"]["status_str"] == "error"):
                    return history
                time.sleep(0.2)
            raise AssertionError("the prompt did not finish")

        def pixels(history):
            from PIL import Image

            image = history["outputs"]["7"]["images"][0]
            return np.asarray(Image.open(base / "output" / image["subfolder"] / image["filename"]))

        node = {"class_type": "CRDiff", "ratios_from": CUSTOM, "down": 0.3, "mid": 0.2, "up": 0.25, "masks": "copy"}
        plain = pixels(run(None))
        assert np.array_equal(pixels(run({**node, "k": 0.0})), plain)
        assert not np.array_equal(pixels(run({**node, "k": 1.5})), plain)
        failed = run({**node, "k": 1.5, "ratios_from": "sdxl@512x512"})
        errors = [m for kind, m in failed["status"]["messages"] if kind == "execution_error"]
        assert errors and errors[0]["exception_message"].startswith("CR-Diff: profile sdxl@512x512 is for sdxl")
    finally:
        server.terminate()
        server.wait(timeout=30)
