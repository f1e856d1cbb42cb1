"""`crdiff generate`: text-to-image, live PyTorch path."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crdiff_cli.cli import MODEL_HELP, PROFILE_HELP, RATIOS_HELP, RES_HELP, app, command, err, out, warn
from crdiff_cli.errors import CrdiffError


@app.command()
@command
def generate(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    res: str = typer.Option(..., "--res", help=RES_HELP),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder for PNGs and manifest.json (created if missing)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A UTF-8 file, one prompt per line (# comments)."),
    k: float = typer.Option(1.5, "--k", help="POA coefficient: e = e_dense + k (e_pruned - e_dense). 0 = dense, "
                            "1 = pruned only; default 1.5 (the reference implementation's), the paper's card uses 1.2."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help=RATIOS_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP + " Default: the paper's profile "
                                          "for the model family at --res (nearest resolution, with a warning)."),
    dense: bool = typer.Option(False, "--dense", help="Run the unmodified model (no pruning, no POA)."),
    compare: bool = typer.Option(False, "--compare", help="Also generate the dense image; write a labelled "
                                 "dense | CR-Diff grid per prompt (compare_<i>.png)."),
    seed: int = typer.Option(0, "--seed", help="First seed; image j of a prompt uses seed + j."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    steps: int = typer.Option(30, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="ddim, pndm, euler, euler-a, dpm++, lms, heun "
                                            "or unipc (default: the model's own)."),
    masks: str = typer.Option("copy", "--masks", help="Pruned twin: 'copy' (masked copies of the targets, "
                              "fastest) or 'on-the-fly' (no extra weights, slower)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (fp16 is for GPUs)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
):
    """Text-to-image with CR-Diff (dense + pruned UNet combined by POA) on the live PyTorch path.

    Writes OUT/<prompt-index>_<seed>.png (generation parameters embedded as PNG text) and
    OUT/manifest.json. Resolution is HEIGHTxWIDTH.
    """
    from crdiff_cli.generate import GenerationSettings, check_k, read_prompts
    from crdiff_cli.models import torch_dtype
    from crdiff_cli.ratios import Ratios
    from crdiff_cli.resolution import Resolution

    resolution = Resolution.parse(res)
    if (prompt is None) == (prompts_file is None):
        raise CrdiffError("pass exactly one of --prompt TEXT or --prompts FILE")
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
    warning = check_k(k)
    if ratios is not None:
        Ratios.parse(ratios)
    if num_images < 1:
        raise CrdiffError(f"--num-images {num_images} must be at least 1")
    if dense and compare:
        raise CrdiffError("--dense and --compare together make no sense; --compare already includes the dense image")
    settings = GenerationSettings(resolution, steps, guidance, negative_prompt, scheduler)
    torch_dtype(dtype)
    if out_dir.exists() and not out_dir.is_dir():
        raise CrdiffError(f"--out {out_dir} is a file; pass a folder")
    if warning:
        warn(warning)

    from crdiff_cli.generate import attach_dual, denoising_calls, run, set_scheduler
    from crdiff_cli.models import load_model
    from crdiff_cli.profile_table import choose_ratios
    from crdiff_cli.prune_spec import PruneSpec

    with err.status(f"loading {model}"):
        loaded = load_model(model, dtype=dtype, device=device)
    info = {"model": model, "family": loaded.family, "dtype": dtype, "device": device}
    dual = None
    if dense:
        info.update(mode="dense", k=0.0)
    else:
        choice = choose_ratios(loaded.family, ratios=ratios, profile=profile, resolution=resolution)
        if choice.warning:
            warn(choice.warning)
        spec = PruneSpec.from_unet(loaded.unet, choice.ratios)
        dual = attach_dual(loaded, spec, k, masks)
        info.update(mode="crdiff", k=k, ratios=str(choice.ratios), ratios_origin=choice.origin,
                    thresholds=spec.thresholds(), masks=masks)
    seeds = list(range(seed, seed + num_images))
    set_scheduler(loaded.pipe, scheduler)
    per_image = denoising_calls(loaded.pipe, steps) * (2 if compare else 1)
    with progress_bars() as bars:
        images = bars.add_task("images", total=len(prompts) * len(seeds) * (2 if compare else 1))
        denoise = bars.add_task("steps", total=len(prompts) * len(seeds) * per_image)
        records = run(loaded.pipe, prompts, seeds, settings, out_dir, model_info=info, dual=dual, compare=compare,
                      on_step=lambda: bars.advance(denoise), on_image=lambda: bars.advance(images))
    what = "dense" if dense else f"CR-Diff k={k:g}, ratios {info['ratios']}"
    out.print(f"wrote {len(records)} images ({what}, {resolution} HxW, {steps} steps) to {out_dir}")


def progress_bars():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)
