"""Baking a whole ONNX pipeline folder: the dual UNet plus every other model, configs, tokenizers, scheduler.

The layout is :mod:`crdiff_cli.deploy.folder`'s (ONNX Runtime / Optimum's, which diffusers'
``OnnxStableDiffusionPipeline`` also loads). The folder is staged beside ``out`` and renamed into place only
after verification: the UNet against the live dual UNet (as :func:`~crdiff_cli.exporters.bake.verify_artifact`
checks a single artifact), the VAE encoder against PyTorch, and the whole folder by generating an image with
the torch-free runner and with the live PyTorch pipeline (CR-Diff applied, same seed, 2 steps), which must
agree within 2/255.

In fp16 the VAE stays fp32 when its config says ``force_upcast``: SD1.x, SD2.x and SDXL's VAEs overflow in
fp16 and can decode black images (diffusers' SDXL pipeline upcasts at run time for that reason; its SD1.x/2.x
pipeline does not). ``crdiff.json`` records each component's dtype, and the fp16 verification decodes the live
pipeline's latents with the same fp32 VAE.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli import __version__
from crdiff_cli.deploy.folder import FORMAT, RECORD, TEXT_ENCODERS, TOKENIZERS, holds_only_ours
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError
from crdiff_cli.exporters.metadata import ArtifactMetadata
from crdiff_cli.exporters.onnx_artifact import DEFAULT_OPSET
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.storage.atomic import OutputKind, folder_files

PIPELINE = OutputKind("baked pipeline folder", f"{RECORD} listing every file in it", holds_only_ours, folder=True)
IMAGE_TOLERANCE = 2  # of 255: the folder's image against the live PyTorch pipeline's
PIPELINE_CLASSES = {"sdxl": "ORTStableDiffusionXLPipeline"}  # Optimum's; SD1.x/2.x: diffusers' ONNX pipeline


@dataclass
class PipelineBakeResult:
    path: Path
    meta: ArtifactMetadata
    record: dict
    unet_report: object | None  # the UNet's VerificationReport, None without --verify
    max_pixel_difference: int | None  # of 255, the folder's image against the live pipeline's
    seconds: float

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def check_pipeline_output(out: Path, overwrite: bool) -> None:
    from crdiff_cli.storage.atomic import check_output

    check_output(out, overwrite, PIPELINE)


def bake_pipeline(loaded, spec: PruneSpec, *, k: float, resolution: Resolution, out: Path,
                  opset: int = DEFAULT_OPSET, verify: bool = True, overwrite: bool = False,
                  on_stage=None, tensorrt_conventions: bool = False,
                  poa: PoaPolicy | None = None) -> PipelineBakeResult:
    """Write ``loaded``'s pipeline with CR-Diff (``spec``, ``k``) baked into its UNet as an ONNX folder ``out``.

    ``loaded`` is a :class:`~crdiff_cli.pipelines.loading.LoadedModel` (plain UNet, LoRAs fused); its models are
    left as they were. ``tensorrt_conventions`` gives the UNet the TensorRT demo's interface
    (:mod:`.tensorrt`). A partial ``poa`` policy is recorded and the UNet gets the one-pass switch, which the
    runner drives step by step (:mod:`crdiff_cli.deploy.poa_steps`). Raises
    :class:`~crdiff_cli.exporters.validate.VerificationError` when ``verify`` finds a mismatch, and then nothing
    is written.
    """
    from crdiff_cli.exporters.bake import verify_artifact
    from crdiff_cli.exporters.onnx_artifact import check_opset, export_onnx
    from crdiff_cli.exporters.onnx_components import export_text_encoder, export_vae
    from crdiff_cli.exporters.tensorrt import apply_tensorrt_conventions
    from crdiff_cli.exporters.validate import VerificationError
    from crdiff_cli.pruning.targets import require_plain
    from crdiff_cli.storage.atomic import atomic_path

    stage = on_stage or (lambda name: None)
    pipe, unet, family = loaded.pipe, loaded.unet, loaded.family
    layout = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    require_plain(unet)
    check_opset(opset)
    if not hasattr(pipe, "text_encoder") or not hasattr(pipe, "vae"):
        raise CrdiffError(f"ONNX pipeline folders are made of Stable Diffusion (SD1.x/2.x/XL) pipelines, not "
                          f"{type(pipe).__name__}")
    if unet.config.get("time_cond_proj_dim") is not None:
        raise CrdiffError("this UNet takes a guidance embedding (time_cond_proj_dim: LCM-distilled), which the "
                          "ONNX pipeline runner does not feed yet; bake an .onnx or .safetensors artifact instead")
    start = time.perf_counter()
    stage("hashing the dense weights")
    poa = poa or PoaPolicy()
    meta = ArtifactMetadata.describe(unet, spec, k, resolution, family, poa, poa_switch=not poa.is_full)
    with atomic_path(out, overwrite, kind=PIPELINE, directory=True) as tmp:
        stage("exporting the dual UNet")
        (tmp / "unet").mkdir()
        export_onnx(unet, meta, tmp / "unet" / "model.onnx", opset=opset, poa_switch=meta.poa_switch)
        unet.save_config(tmp / "unet")
        dtypes = {"unet": meta.dtype}
        for encoder in TEXT_ENCODERS[layout]:
            stage(f"exporting {encoder}")
            model = getattr(pipe, encoder)
            export_text_encoder(model, tmp / encoder / "model.onnx", hidden_states=layout == "sdxl", opset=opset)
            model.config.save_pretrained(tmp / encoder)
            getattr(pipe, TOKENIZERS[encoder]).save_pretrained(tmp / TOKENIZERS[encoder])
            dtypes[encoder] = _dtype(model)
        stage("exporting the VAE")
        vae = pipe.vae
        if _dtype(vae) == "float16" and vae.config.get("force_upcast", False):
            vae = copy.deepcopy(vae).float()  # fp16 overflows in these VAEs: black images
        export_vae(vae, tmp, opset=opset)
        for part in ("vae_decoder", "vae_encoder"):
            vae.save_config(tmp / part)
            dtypes[part] = _dtype(vae)
        pipe.scheduler.save_config(tmp / "scheduler")
        _write_json(tmp / "model_index.json", _model_index(pipe, layout))
        report = pixels = None
        try:
            if verify:
                stage("verifying the UNet against the live dual UNet")
                report = verify_artifact(tmp / "unet" / "model.onnx", unet, meta)
                stage("verifying the VAE encoder")
                _verify_vae_encoder(tmp, vae)
            if tensorrt_conventions:
                apply_tensorrt_conventions(tmp / "unet" / "model.onnx")
            (tmp / "TENSORRT.md").write_text(_recipe(unet, vae, meta, tensorrt_conventions), encoding="utf-8")
            record = _record(meta, layout, dtypes, loaded.source, tmp,
                             "tensorrt" if tensorrt_conventions else None)
            _write_json(tmp / RECORD, record)
            if verify:
                stage("verifying the whole folder against the live pipeline")
                pixels = verify_folder(tmp, loaded, spec, k, resolution, vae, poa)
        except VerificationError as exc:
            raise type(exc)(f"{exc}; no folder was written") from None
    return PipelineBakeResult(Path(out), meta, record, report, pixels, time.perf_counter() - start)


def verify_folder(folder: Path, loaded, spec: PruneSpec, k: float, resolution: Resolution, vae,
                  poa: PoaPolicy | None = None, *, steps: int = 2, seed: int = 0,
                  prompt: str = "a photograph of an astronaut riding a horse") -> int:
    """Generate one image with the torch-free runner on ``folder`` and one with ``loaded``'s pipeline with
    CR-Diff applied (same prompt, seed, steps, POA policy and scheduler: the base one, or Euler when it has no
    numpy twin; a partial policy over enough steps that its window holds a refresh cycle, :func:`policy_steps`),
    its latents decoded by ``vae`` (the folder's VAE: an fp32 copy in an fp16 folder); returns their largest
    pixel difference and raises :class:`~crdiff_cli.exporters.validate.ToleranceExceededError` above
    :data:`IMAGE_TOLERANCE`."""
    import numpy as np
    import torch

    from crdiff_cli import defaults
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
    from crdiff_cli.deploy.schedulers import make_scheduler
    from crdiff_cli.dual.apply import apply_crdiff, remove_crdiff
    from crdiff_cli.exporters.validate import ToleranceExceededError
    from crdiff_cli.pipelines.schedulers import set_scheduler

    pipe = loaded.pipe
    steps = steps if poa is None or poa.is_full else policy_steps(poa)
    try:
        make_scheduler(None, dict(pipe.scheduler.config))
        scheduler = None
    except ValueError:
        scheduler = "euler"
    runner = OnnxCrdiffPipeline.from_folder(folder, provider="cpu")
    ours = runner(prompt, seeds=seed, steps=steps, height=resolution.height, width=resolution.width,
                  scheduler=scheduler)[0]
    base_scheduler = pipe.scheduler
    set_scheduler(pipe, scheduler)
    apply_crdiff(pipe, spec, k=k, poa=poa)
    try:
        latents = pipe(prompt, height=resolution.height, width=resolution.width, num_inference_steps=steps,
                       guidance_scale=defaults.GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed),
                       output_type="latent").images
        with torch.no_grad():
            decoded = vae.decode(_unscaled(latents.to(vae.dtype), vae.config), return_dict=False)[0]
        live = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
    finally:
        remove_crdiff(pipe)
        pipe.scheduler = base_scheduler
    difference = int(np.abs(np.asarray(ours, np.int16) - np.asarray(live, np.int16)).max())
    if difference > IMAGE_TOLERANCE:
        raise ToleranceExceededError(f"verification failed: the folder's image differs from the live pipeline's by "
                                     f"{difference}/255 (tolerance {IMAGE_TOLERANCE}/255, {steps} steps, seed {seed})")
    return difference


def policy_steps(poa: PoaPolicy, most: int = 20) -> int:
    """Steps for verifying a partial policy: enough that its window holds a both-passes step and a cached one
    after it (refresh + 1 steps), and steps outside it, within ``most``."""
    start, stop = poa.window
    return min(most, max(4, math.ceil((poa.refresh + 1) / max(stop - start, 1e-9)) + 1))


def _unscaled(latents, config):
    """Latents as the VAE decodes them, as diffusers' pipelines unscale them (SDXL's latents_mean/std too)."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return (latents * latents.new_tensor(std).view(shape) / config.scaling_factor
                + latents.new_tensor(mean).view(shape))
    return latents / config.scaling_factor


def _verify_vae_encoder(folder: Path, vae) -> None:
    """The exported VAE encoder against ``vae.encode(x).latent_dist.mean`` on a seeded image."""
    import onnxruntime as ort
    import torch

    from crdiff_cli.deploy.folder import vae_scale
    from crdiff_cli.exporters.validate import TOLERANCES, ToleranceExceededError

    dtype = next(vae.parameters()).dtype
    factor = vae_scale(vae.config)
    image = torch.rand(1, vae.config.in_channels, 2 * factor, 3 * factor, generator=torch.Generator().manual_seed(0))
    image = (image * 2 - 1).to(dtype)
    with torch.no_grad():
        expected = vae.encode(image).latent_dist.mean.float()
    session = ort.InferenceSession(str(folder / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"sample": image.numpy()})[0]).float()
    relative = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-30)
    tolerance = TOLERANCES[str(dtype).removeprefix("torch.")]
    if not relative <= tolerance:
        raise ToleranceExceededError(f"verification failed: the VAE encoder's relative error {relative:.3g} exceeds "
                                     f"{tolerance:g}")


def _dtype(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _model_index(pipe, layout: str) -> dict:
    """``model_index.json`` as diffusers' ONNX pipeline (SD1.x/2.x) and Optimum's loaders read it."""
    import diffusers

    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    index = {"_class_name": PIPELINE_CLASSES.get(layout, "OnnxStableDiffusionPipeline"),
             "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(pipe.scheduler).__name__],
             "unet": onnx_model, "vae_decoder": onnx_model, "vae_encoder": onnx_model}
    for encoder in TEXT_ENCODERS[layout]:
        index[encoder] = onnx_model
        index[TOKENIZERS[encoder]] = ["transformers", type(getattr(pipe, TOKENIZERS[encoder])).__name__]
    if layout == "sdxl":
        index["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return dict(sorted(index.items()))


def _recipe(unet, vae, meta: ArtifactMetadata, conventions: bool) -> str:
    from crdiff_cli.deploy.folder import vae_scale
    from crdiff_cli.exporters.tensorrt import recipe

    config = unet.config
    added = None
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        added = {"text_embeds": config["projection_class_embeddings_input_dim"] - 6 * time_dim, "time_ids": 6}
    return recipe(family=meta.family, dtype=meta.dtype, height=meta.resolution.height, width=meta.resolution.width,
                  channels=config["in_channels"], scale=vae_scale(vae.config), text_dim=config["cross_attention_dim"],
                  added=added,
                  conventions=conventions)


def _record(meta: ArtifactMetadata, layout: str, dtypes: dict[str, str], source: str, folder: Path,
            conventions: str | None) -> dict:
    """``crdiff.json``: what was baked, from which base model, the sizes it serves, and every file's SHA-256."""
    from crdiff_cli.deploy.folder import resolution_range
    from crdiff_cli.storage.digest_cache import file_sha256

    files = {name: file_sha256(folder / name) for name in sorted(folder_files(folder) - {RECORD})}
    resolution = meta.resolution
    return {"format": FORMAT, "crdiff_version": __version__, "family": meta.family, "layout": layout,
            "base_model": source,
            "base_unet_sha256": meta.base_unet_sha256, "unet_conventions": conventions or "onnxruntime",
            "resolution": {"height": resolution.height, "width": resolution.width},
            "resolution_range": resolution_range(resolution.height, resolution.width),
            "k": meta.k, "poa": meta.poa.to_dict(), "poa_switch": meta.poa_switch,
            "thresholds": meta.spec.thresholds(), **meta.spec.to_dict(),
            "components": {name: {"dtype": dtype} for name, dtype in dtypes.items()},
            "files": files}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
