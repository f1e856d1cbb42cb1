"""`crdiff generate`: text-to-image, live PyTorch path."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crdiff_cli import defaults
from crdiff_cli.cli.shared import (CONTROL_IMAGE_OPTION, CONTROL_SCALE_OPTION, CONTROLNET_OPTION, GUIDANCE_HELP,
                                   INIT_IMAGE_OPTION, LORA_OPTION, MASK_IMAGE_OPTION, MASKS_HELP, MODEL_HELP,
                                   POA_INTERVAL_OPTION, POA_OUTSIDE_OPTION, POA_REFRESH_OPTION, PROFILE_HELP,
                                   RATIOS_HELP, RES_HELP, SCHEDULER_HELP, STRENGTH_OPTION, command, err, out, plural,
                                   poa_policy, start_ranks, warn)
from crdiff_cli.errors import CrdiffError


@command
def generate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " With --artifact: the base model "
                                        "(text encoders, VAE, scheduler)."),
    res: Optional[str] = typer.Option(None, "--res", help=RES_HELP + " Required without --artifact."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder for PNGs and manifest.json: new or empty "
                                 "(or a previous generate output, with --overwrite)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A UTF-8 file, one prompt per line."),
    k: Optional[float] = typer.Option(None, "--k", help="POA: e = e_dense + k (e_pruned - e_dense); 0 dense, 1 pruned. "
                                      f"default {defaults.K:g} (reference code; paper: 1.2) or the artifact's."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help=RATIOS_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP + " Default: the family's Table 6 "
                                          "profile nearest --res."),
    dense: bool = typer.Option(False, "--dense", help="Run the unmodified model."),
    poa_interval: Optional[str] = POA_INTERVAL_OPTION,
    poa_outside: Optional[str] = POA_OUTSIDE_OPTION,
    poa_refresh: Optional[int] = POA_REFRESH_OPTION,
    trace_poa: bool = typer.Option(False, "--trace-poa", help="Also write poa_trace.json/.png: where POA acts, "
                                   "per step."),
    compare: bool = typer.Option(False, "--compare", help="Also generate the dense image and a dense | CR-Diff | "
                                 "difference grid per prompt."),
    seed: int = typer.Option(0, "--seed", help="First seed; image j of a prompt uses seed + j."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    steps: int = typer.Option(defaults.STEPS, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(defaults.GUIDANCE, "--guidance", help=GUIDANCE_HELP),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    masks: str = typer.Option(defaults.MASKS, "--masks", help=MASKS_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (fp16 is for GPUs). Default fp32; "
                                        "with a .safetensors artifact, the artifact's."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="A baked .safetensors/.onnx UNet replacing "
                                            "--model's; its settings are the defaults."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="A baked ONNX pipeline folder, run without "
                                            "torch."),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX Runtime provider (.onnx, --pipeline): "
                                           "tensorrt, cuda or cpu (default: best available)."),
    ort_fold_masks: bool = typer.Option(True, "--ort-fold-masks/--no-ort-fold-masks", help="ONNX Runtime: precompute "
                                        "pruned weights at load (fast, +1 copy of the targets) or mask per call."),
    lora: Optional[list[str]] = LORA_OPTION,
    controlnet: Optional[str] = CONTROLNET_OPTION,
    control_image: Optional[Path] = CONTROL_IMAGE_OPTION,
    control_scale: float = CONTROL_SCALE_OPTION,
    init_image: Optional[Path] = INIT_IMAGE_OPTION,
    strength: Optional[float] = STRENGTH_OPTION,
    mask_image: Optional[Path] = MASK_IMAGE_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous crdiff generate output in --out."),
):
    """Text-to-image with CR-Diff (dense + pruned UNet combined by POA).

    Writes OUT/<prompt>_<seed>.png (parameters as PNG text) and OUT/manifest.json. --controlnet,
    --init-image and --mask-image use diffusers' matching pipeline around the same dual UNet.
    Many GPUs: torchrun --nproc-per-node N -m crdiff_cli generate ... (docs/distributed.md).
    """
    flags = dict(locals())  # every option as given, for --pipeline's own checks
    from crdiff_cli.pipelines.prompts import read_prompts
    from crdiff_cli.validation import check_prompt

    if (prompt is None) == (prompts_file is None):
        raise CrdiffError("pass exactly one of --prompt TEXT or --prompts FILE")
    prompts = [check_prompt("--prompt", prompt)] if prompt is not None else read_prompts(prompts_file)
    check_prompt("--negative-prompt", negative_prompt, empty_ok=True)
    if num_images < 1:
        raise CrdiffError(f"--num-images {num_images} must be at least 1")
    seeds = list(range(seed, seed + num_images))
    if pipeline is not None:
        return _generate_from_folder(pipeline, prompts, seeds, flags)
    if model is None:
        raise CrdiffError("pass --model NAME_OR_PATH (or --pipeline DIR for a baked ONNX pipeline folder)")
    from crdiff_cli.dual.options import MASK_MODES, check_k
    from crdiff_cli.pipelines.conditioning import ImageInputs
    from crdiff_cli.pipelines.generation import GenerationSettings
    from crdiff_cli.pipelines.image_folder import IMAGES
    from crdiff_cli.pipelines.loading import torch_dtype
    from crdiff_cli.pipelines.lora import prepare_loras
    from crdiff_cli.pruning.profile_table import check_ratio_source, get_profile
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.storage.atomic import check_output
    from crdiff_cli.validation import check_device

    meta = _artifact_metadata(artifact, res, provider, ort_fold_masks)
    policy = poa_policy(poa_interval, poa_outside, poa_refresh, meta.poa if meta is not None else None)
    if dense and (not policy.is_full or trace_poa):
        raise CrdiffError("--poa-interval, --poa-refresh and --trace-poa shape CR-Diff's steps; --dense has none: "
                          "drop one or the other")
    resolution = Resolution.parse(res) if res is not None else meta.resolution
    warning = check_k(k) if k is not None else None
    check_ratio_source(ratios=ratios, profile=profile, resolution=resolution)
    if masks not in MASK_MODES:
        raise CrdiffError(f"--masks {masks!r} is not a mask mode; use one of {', '.join(MASK_MODES)}")
    wanted = None  # ratios asked for explicitly (an artifact brings its own)
    if meta is not None:
        wanted = Ratios.parse(ratios) if ratios is not None else get_profile(profile).ratios if profile else None
        _check_artifact_options(artifact, meta, k=k, ratios=wanted, dtype=str(torch_dtype(dtype)).removeprefix("torch.")
                                if dtype else None, dense=dense, compare=compare, provider=provider,
                                fold_masks=ort_fold_masks, policy=policy, trace=trace_poa)
        if artifact.suffix == ".safetensors" and meta.dtype == "float16":
            dtype = dtype or "fp16"
    dtype = dtype or "fp32"
    if dense and compare:
        raise CrdiffError("--dense and --compare together make no sense; --compare already includes the dense image")
    inputs = ImageInputs(controlnet, control_image, control_scale, init_image, strength, mask_image)
    inputs.check(model, onnx=artifact is not None and artifact.suffix == ".onnx")
    settings = GenerationSettings(resolution, steps, guidance, negative_prompt, scheduler,
                                  inputs if inputs.active else None)
    torch_dtype(dtype)
    check_device(device)
    check_output(out_dir, overwrite, IMAGES)
    loras = prepare_loras(lora, model)
    if warning:
        warn(warning)

    from crdiff_cli.dual.apply import apply_crdiff
    from crdiff_cli.pipelines.images import crdiff_info
    from crdiff_cli.pipelines.prepare import choose_spec, load_prepared
    from crdiff_cli.pipelines.schedulers import set_scheduler
    from crdiff_cli.pipelines.to_folder import generate_to_folder

    ranks = start_ranks(device)
    if trace_poa and ranks.distributed:
        raise CrdiffError("--trace-poa traces one process; run it without torchrun")
    with err.status(f"loading {model}"):
        loaded = load_prepared(model, dtype=dtype, device=ranks.device(device), loras=loras, inputs=inputs)
    info = {"model": model, "family": loaded.family, "dtype": dtype, "device": device,
            **({"loras": [x.label for x in loras]} if loras else {}), **inputs.info()}
    dual = None
    if meta is not None:
        from crdiff_cli.exporters.artifacts import attach_artifact

        with err.status(f"loading {artifact}"):
            dual, artifact_info = attach_artifact(loaded, artifact, meta, k=k, ratios=wanted, masks=masks,
                                                  provider=provider, fold_masks=ort_fold_masks, warn=warn, poa=policy)
        info.update(artifact_info)
    elif dense:
        info.update(mode="dense", k=0.0)
    else:
        choice, spec = choose_spec(loaded, ratios=ratios, profile=profile, resolution=resolution, warn=warn)
        k = defaults.K if k is None else k
        dual = apply_crdiff(loaded.pipe, spec, k=k, masks=masks, poa=policy)
        info.update(crdiff_info(choice, spec, k, masks, policy))
    if trace_poa:
        from crdiff_cli.dual.poa_steps import PoaTrace

        loaded.pipe.unet.poa.trace = PoaTrace()
    from crdiff_cli.pipelines.image_folder import clear_image_folder

    # empty, or a previous output that --overwrite replaces (check_output made sure); on rank 0, which writes
    ranks.on_main(lambda: out_dir.is_dir() and clear_image_folder(out_dir))
    set_scheduler(loaded.pipe, scheduler)
    per_image = inputs.denoising_calls(loaded.pipe, steps)  # PNDM makes one more; img2img fewer
    from crdiff_cli.storage.atomic import write_errors

    with progress_bars() as bars, write_errors(out_dir):  # a disk filling up mid-run: one line, finished images kept
        images = bars.add_task("images", total=len(prompts) * len(seeds) * (2 if compare else 1))
        # the steps of the image being made (under torchrun, steps are per rank: no steps bar)
        denoise = None if ranks.distributed else bars.add_task("steps", total=per_image)

        def step() -> None:
            if bars.tasks[denoise].completed >= per_image:
                bars.reset(denoise)
            bars.advance(denoise)

        records = generate_to_folder(loaded.pipe, prompts, seeds, settings, out_dir, model_info=info, dual=dual,
                                     compare=compare, on_step=None if denoise is None else step,
                                     on_image=lambda: bars.advance(images), ranks=ranks)
    if trace_poa:
        from crdiff_cli.pipelines.poa_trace_file import write_poa_trace

        write_poa_trace(out_dir, loaded.pipe.unet.poa.trace.entries, {key: info.get(key) for key in (
            "model", "k", "ratios", "poa")} | {"scheduler": scheduler, "steps": steps, "resolution": str(resolution)})
    what = "dense" if dense else f"CR-Diff k={info['k']:g}, ratios {info['ratios']}"
    if not dense and not policy.is_full:
        what += f", POA {policy.describe()} ({policy.cost(per_image):.2f}x dense passes)"
    if meta is not None:
        what += f", from {artifact}" + (f" on {info['provider']}" if "provider" in info else "")
    out.print(f"wrote {plural(len(records), 'image')} ({what}, {resolution} HxW, {steps} steps) to {out_dir}")


def _artifact_metadata(artifact: Optional[Path], res: Optional[str], provider: Optional[str], fold_masks: bool):
    """The artifact's metadata (read before any model is loaded), or None without --artifact."""
    if artifact is None:
        if res is None:
            raise CrdiffError("--res HxW is required (only an --artifact brings its own resolution)")
        if provider is not None or not fold_masks:
            raise CrdiffError("--provider and --no-ort-fold-masks apply to .onnx artifacts; pass --artifact PATH")
        return None
    from crdiff_cli.exporters.artifacts import read_metadata

    return read_metadata(artifact)


def _check_artifact_options(path: Path, meta, *, k: float | None, ratios, dtype: str | None,
                            dense: bool = False, compare: bool = False, provider: str | None = None,
                            fold_masks: bool = True, policy=None, trace: bool = False) -> None:
    """Refuse, before anything is loaded, the options the artifact at ``path`` cannot honour.

    ``ratios`` is a :class:`~crdiff_cli.pruning.ratios.Ratios` or None; ``dtype`` a torch dtype name or None.
    """
    from crdiff_cli.exporters.artifacts import format_of as artifact_format

    if dense:
        raise CrdiffError("--dense runs the base model as it is; drop --artifact or --dense")
    if artifact_format(path) == "safetensors":
        if provider is not None or not fold_masks:
            raise CrdiffError("--provider and --no-ort-fold-masks apply to .onnx artifacts; a .safetensors artifact "
                              "runs on the live PyTorch path")
        if dtype is not None and dtype != meta.dtype:
            raise CrdiffError(f"the artifact's weights are {meta.dtype}; omit --dtype or pass the matching one")
        return
    if compare:
        raise CrdiffError("--compare needs the dense model, which an ONNX artifact does not expose; use the "
                          ".safetensors artifact")
    if k is not None and k != meta.k:
        raise CrdiffError(f"k = {meta.k:g} is folded into the ONNX artifact; re-bake it for --k {k:g} (or use a "
                          ".safetensors artifact, whose k can change)")
    if ratios is not None and ratios != meta.spec.ratios:
        raise CrdiffError(f"the ONNX artifact's thresholds are for ratios {meta.spec.ratios}; re-bake it for "
                          f"{ratios} (or use a .safetensors artifact)")
    if trace and not meta.poa_switch:
        raise CrdiffError("--trace-poa needs both branches' outputs, which this ONNX graph does not return; bake it "
                          "with a POA policy (the one-pass switch) or use a .safetensors artifact")
    if policy is not None and not policy.is_full and not meta.poa_switch:
        raise CrdiffError(f"this ONNX artifact was baked for full POA only; re-bake it with the --poa-* flags to "
                          f"run POA {policy.describe()} (or use a .safetensors artifact)")
    if provider is not None:
        from crdiff_cli.deploy.sessions import providers_for

        providers_for(provider)


def progress_bars():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


# generate's options that the torch-free runner has no use for, with the value that means "not given"
_NOT_WITH_PIPELINE = {"model": None, "k": None, "ratios": None, "profile": None, "dense": False,
                      "trace_poa": False, "compare": False,
                      "masks": defaults.MASKS, "dtype": None, "device": "cpu", "artifact": None, "ort_fold_masks": True,
                      "lora": None, "controlnet": None, "control_image": None, "control_scale": 1.0, "init_image": None,
                      "strength": None, "mask_image": None}


def _generate_from_folder(folder: Path, prompts: list[str], seeds: list[int], options: dict) -> None:
    """``generate --pipeline DIR``: the folder's images with the torch-free runner (no torch, diffusers or
    transformers is imported), written as the live path writes them."""
    from crdiff_cli.deploy.folder import open_folder
    from crdiff_cli.deploy.runner import OnnxCrdiffPipeline, check_policy, check_request
    from crdiff_cli.deploy.sessions import providers_for
    from crdiff_cli.dual.poa_policy import PoaPolicy
    from crdiff_cli.pipelines.generation import GenerationSettings
    from crdiff_cli.pipelines.image_folder import IMAGES, clear_image_folder
    from crdiff_cli.pipelines.to_folder import generate_to_folder
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.storage.atomic import check_output, write_errors

    given = [name for name, unset in _NOT_WITH_PIPELINE.items() if options[name] not in (unset, [])]
    if given:
        flag = "--" + given[0].replace("_", "-").replace("ort-fold-masks", "no-ort-fold-masks")
        raise CrdiffError(f"{flag} does not apply to --pipeline: the folder brings its model, k, ratios and dtype; "
                          "drop it, or use --model / --artifact for the live PyTorch path")
    out_dir = options["out_dir"]
    with err.status(f"checking {folder}"):
        checked = open_folder(folder)
    baked = checked.record["resolution"]
    resolution = Resolution.parse(options["res"] or f"{baked['height']}x{baked['width']}")
    settings = GenerationSettings(resolution, options["steps"], options["guidance"], options["negative_prompt"],
                                  options["scheduler"])
    check_request(checked, resolution.height, resolution.width, settings.scheduler, settings.steps)
    policy = check_policy(checked, poa_policy(options["poa_interval"], options["poa_outside"], options["poa_refresh"],
                                              PoaPolicy.from_dict(checked.record["poa"])))
    providers_for(options["provider"])
    check_output(out_dir, options["overwrite"], IMAGES)

    with err.status(f"loading {folder}"):
        runner = OnnxCrdiffPipeline.from_folder(checked, provider=options["provider"])
    record = checked.record
    info = {"pipeline": str(folder), "model": record["base_model"], "family": checked.family, "mode": "crdiff",
            "k": checked.k, "ratios": str(Ratios.from_dict(record["ratios"])), "thresholds": record["thresholds"],
            "dtype": checked.dtype("unet"), "provider": runner.provider, "runtime": "onnxruntime (torch-free)",
            "poa": policy.to_dict()}
    if out_dir.is_dir():
        clear_image_folder(out_dir)
    with progress_bars() as bars, write_errors(out_dir):
        images = bars.add_task("images", total=len(prompts) * len(seeds))
        steps = bars.add_task("steps", total=runner.denoising_calls(settings.steps, settings.scheduler))

        def render(text: str, seed: int):
            bars.reset(steps)
            return runner(text, seeds=seed, negative_prompt=settings.negative_prompt, steps=settings.steps,
                          guidance=settings.guidance, height=resolution.height, width=resolution.width,
                          scheduler=settings.scheduler, on_step=lambda: bars.advance(steps), poa=policy)[0]

        records = generate_to_folder(None, prompts, seeds, settings, out_dir, model_info=info,
                                     on_image=lambda: bars.advance(images), render=render)
    what = f"CR-Diff k={checked.k:g}" + ("" if policy.is_full else f", POA {policy.describe()}")
    out.print(f"wrote {plural(len(records), 'image')} ({what} from {folder} on {runner.provider}, {resolution} HxW, "
              f"{settings.steps} steps) to {out_dir}")
