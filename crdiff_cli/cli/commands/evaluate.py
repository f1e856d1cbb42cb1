"""`crdiff evaluate`: Table 7 / Table 8 of the paper (dense, pruned, CR-Diff) on your model and resolutions."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from crdiff_cli import defaults
from crdiff_cli.cli.shared import (CONTROL_IMAGE_OPTION, CONTROL_SCALE_OPTION, CONTROLNET_OPTION, INIT_IMAGE_OPTION,
                                   LORA_OPTION, MASK_IMAGE_OPTION, MODEL_HELP, PROFILE_HELP, RATIOS_HELP, RES_HELP,
                                   SCHEDULER_HELP, STRENGTH_OPTION, command, err, out, plural, start_ranks, warn)
from crdiff_cli.errors import CrdiffError


@command
def evaluate(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    res: List[str] = typer.Option(..., "--res", metavar="HxW", help=RES_HELP + " Repeat for several resolutions."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: images/, scores.jsonl, results.csv/json, "
                                 "paired.csv, report.html."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="A single prompt."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A text file (one prompt per line), an "
                                                "MS-COCO captions JSON (sampled as --coco-sample says) or a prompt "
                                                "set saved by --save-prompt-set."),
    coco_sample: Optional[str] = typer.Option(None, "--coco-sample", metavar="paper|first", help="COCO captions JSON: "
                                              "paper (default; the authors' seeded 5,000-image sample, a random "
                                              "caption each, skipping images missing from --reference-images) or "
                                              "first (first images by id, one caption each)."),
    save_prompt_set: Optional[Path] = typer.Option(None, "--save-prompt-set", metavar="FILE.json", help="Write the "
                                                   "COCO prompt set (name, image id, caption, image file of every "
                                                   "prompt) to FILE.json, then run; pass it back as --prompts to "
                                                   "reuse it."),
    variants: str = typer.Option("dense,pruned,crdiff", "--variants", help="Comma-separated: dense, pruned (k = 1), "
                                 "crdiff (at --k), and POA policies crdiff@START:STOP[+pruned], crdiff/refreshN."),
    k: float = typer.Option(defaults.K, "--k", help="POA coefficient of the crdiff variants."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help=RATIOS_HELP + " Used at every resolution."),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP + " Default: the family's profile at "
                                          "each resolution (nearest, with a warning)."),
    metrics: str = typer.Option("imagereward", "--metrics", help="Comma-separated: imagereward[:CKPT], clip:MODEL, "
                                "pickscore:MODEL, aesthetic:HEAD, fid[:INCEPTION_WEIGHTS], tiny."),
    reference_images: Optional[Path] = typer.Option(None, "--reference-images", help="Folder of real images for fid "
                                                    "(COCO's val2014 with a COCO captions JSON)."),
    fid_resize: Optional[str] = typer.Option(None, "--fid-resize", metavar="256|none", help="FID preprocessing: 256 "
                                             "(default) resizes generated and real images to 256x256, bicubic, as "
                                             "the paper's evaluation does; none feeds them as they are."),
    seed: int = typer.Option(0, "--seed", help="First seed; image j of a prompt uses seed + j."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt and variant."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts."),
    steps: int = typer.Option(defaults.STEPS, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(defaults.GUIDANCE, "--guidance", help="Classifier-free guidance scale."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    lora: Optional[List[str]] = LORA_OPTION,
    controlnet: Optional[str] = CONTROLNET_OPTION,
    control_image: Optional[Path] = CONTROL_IMAGE_OPTION,
    control_scale: float = CONTROL_SCALE_OPTION,
    init_image: Optional[Path] = INIT_IMAGE_OPTION,
    strength: Optional[float] = STRENGTH_OPTION,
    mask_image: Optional[Path] = MASK_IMAGE_OPTION,
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per pipeline call and metric batch on a GPU "
                                   "(on CPU, one by one whatever B is: bit for bit `crdiff generate`'s)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (fp16 is for GPUs)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out: skip what scores.jsonl records."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out that holds a previous run."),
):
    """Evaluate dense, pruned and CR-Diff images of the same prompts and seeds (the paper's Tables 7 and 8).

    Writes OUT/images/<HxW>/<variant>/<prompt>_<seed>.png, OUT/scores.jsonl (resumable), OUT/results.csv and
    results.json (means with 95% bootstrap intervals), OUT/paired.csv (CR-Diff vs pruned and vs dense:
    paired difference, win rate, p-value) and OUT/report.html.

    Many GPUs or machines: torchrun --nproc-per-node N -m crdiff_cli evaluate ... (same files as one
    process; --resume works with any number of ranks; docs/distributed.md).
    """
    from crdiff_cli.dual.options import check_k
    from crdiff_cli.evaluation.fid import DEFAULT_FID_RESIZE, parse_fid_resize, resize_label
    from crdiff_cli.evaluation.metrics import parse_metrics
    from crdiff_cli.evaluation.protocol import SCORES, parse_variants, prompt_source, prompts_hash, work_items
    from crdiff_cli.pipelines.conditioning import ImageInputs
    from crdiff_cli.pipelines.generation import GenerationSettings
    from crdiff_cli.pipelines.loading import torch_dtype
    from crdiff_cli.pipelines.lora import prepare_loras
    from crdiff_cli.pruning.profile_table import check_ratio_source
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.validation import check_device, check_prompt

    resolutions = list(dict.fromkeys(Resolution.parse(r) for r in res))
    resize = parse_fid_resize(DEFAULT_FID_RESIZE if fid_resize is None else fid_resize)
    source = prompt_source(prompt=prompt, prompts_file=prompts_file, coco_sample=coco_sample,
                           reference_images=reference_images, limit=limit)
    if save_prompt_set is not None and source.full is None:
        raise CrdiffError("--save-prompt-set writes the prompt set of a COCO captions JSON; pass --prompts FILE.json")
    if source.warning:
        warn(source.warning)
    prompts = source.prompts
    check_prompt("--negative-prompt", negative_prompt, empty_ok=True)
    variant_list = parse_variants(variants)
    k_warning = check_k(k)
    check_ratio_source(ratios=ratios, profile=profile, resolution=resolutions[0])
    for name, value in (("--num-images", num_images), ("--batch-size", batch_size)):
        if value < 1:
            raise CrdiffError(f"{name} {value} must be at least 1")
    torch_dtype(dtype)
    check_device(device)
    inputs = ImageInputs(controlnet, control_image, control_scale, init_image, strength, mask_image)
    inputs.check(model)
    loras = prepare_loras(lora, model)
    settings = {r: GenerationSettings(r, steps, guidance, negative_prompt, scheduler, inputs if inputs.active else None)
                for r in resolutions}
    seeds = list(range(seed, seed + num_images))
    specs = parse_metrics(metrics, reference_images=reference_images, num_generated=len(prompts) * len(seeds),
                          reference_files=source.reference_files, sampler_uses_reference=source.sampler_uses_reference)
    has_fid = any(s.name == "fid" for s in specs)
    if fid_resize is not None and not has_fid:
        raise CrdiffError("--fid-resize is only used by the fid metric; add fid to --metrics or drop it")
    identity = {"model": model, "resolutions": [str(r) for r in resolutions], "variants": variant_list, "k": k,
                "ratios": ratios, "profile": profile, "metrics": [s.spec for s in specs],
                "reference_images": str(reference_images.resolve()) if reference_images else None,
                "prompts_sha256": prompts_hash(prompts), "num_prompts": len(prompts), "seeds": seeds, "steps": steps,
                "guidance": guidance, "negative_prompt": negative_prompt, "scheduler": scheduler, "dtype": dtype,
                "device": device, "batch_size": batch_size, "loras": [x.label for x in loras], **inputs.info(),
                "prompt_set": source.identity(), "fid_resize": resize_label(resize) if has_fid else None}
    ranks = start_ranks(device)
    ranks.on_main(lambda: _prepare_outputs(out_dir, identity, source, save_prompt_set, resume=resume,
                                           overwrite=overwrite))  # files: rank 0's
    if k_warning:
        warn(k_warning)
    items = work_items(resolutions, variant_list, len(prompts), seeds)

    from crdiff_cli.evaluation.protocol import finish, start
    from crdiff_cli.runtime.distributed import RankFailure

    with err.status(f"loading {model} and the metric models"):
        session = start(model=model, identity=identity, settings=settings, prompts=prompts, specs=specs,
                        reference_images=reference_images, k=k, ratios=ratios, profile=profile, dtype=dtype,
                        device=device, out_dir=out_dir, resume=resume, overwrite=overwrite, warn=warn, ranks=ranks,
                        loras=loras, inputs=inputs, reference_files=source.reference_files, fid_resize=resize)
    from crdiff_cli.storage.atomic import write_errors

    resume_hint = f"every finished batch is in {out_dir / SCORES}: add --resume to continue"
    with _progress() as bars, write_errors(out_dir):  # a disk filling up mid-run: one line, finished batches kept
        todo = session.pending(items, batch_size)
        made = sum(len(b) for b in todo)
        images = bars.add_task("images", total=len(items), completed=len(items) - made)
        try:
            session.run(todo, on_batch=lambda n: bars.advance(images, n))
        except RankFailure as exc:
            raise RankFailure(f"{exc}; {resume_hint}") from None
        except KeyboardInterrupt:
            err.print(f"interrupted; {resume_hint}")
            raise typer.Exit(130) from None
    if not ranks.is_main:
        return
    with err.status("computing results"), write_errors(out_dir):
        results = finish(session, items, variant_list, resolutions)
    out.print(results_table(results.rows, specs, variant_list, [str(r) for r in resolutions]))
    done = f"{plural(made, 'new image')} ({len(items) - made:,} already made)" if made < len(items) else \
        plural(made, "image")
    costs = {r["variant"]: r["passes_per_step"] for r in results.rows if r.get("passes_per_step") is not None}
    if any(v.startswith("crdiff") and v != "crdiff" for v in variant_list):  # POA policies: say what they cost
        out.print("UNet passes per step (counted): " + ", ".join(f"{v} {c:g}" for v, c in costs.items())
                  + f"; measured seconds per image in {out_dir / 'timings.csv'}")
    out.print(f"wrote {done}, scores.jsonl, results.csv/json, paired.csv, timings.csv and report.html to {out_dir}")


def _prepare_outputs(out_dir: Path, identity: dict, source, save_prompt_set: Path | None, *, resume: bool,
                     overwrite: bool) -> None:
    """Check --save-prompt-set and --out (before either is written), then write the prompt set."""
    from crdiff_cli.evaluation.coco import check_save_path, save_prompt_set as save

    if save_prompt_set is not None:
        check_save_path(source.full, save_prompt_set, overwrite=overwrite)
    _check_out(out_dir, identity, resume=resume, overwrite=overwrite)
    if save_prompt_set is not None:
        save(source.full, save_prompt_set, overwrite=overwrite)


def _check_out(out_dir: Path, identity: dict, *, resume: bool, overwrite: bool) -> None:
    """--out can take this run (a new folder, or one whose scores.jsonl matches --resume/--overwrite); creates it."""
    from crdiff_cli.evaluation.protocol import SCORES
    from crdiff_cli.storage.atomic import check_writable, clean_stale, make_folder
    from crdiff_cli.storage.journal import check_journal, is_journal

    if out_dir.exists() and not out_dir.is_dir():
        raise CrdiffError(f"--out {out_dir} is a file; pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_journal(out_dir / SCORES, "evaluation"):
        raise CrdiffError(f"output {out_dir} exists and is not a crdiff evaluation folder (no {SCORES}); crdiff never "
                          "writes into what it did not create, even with --overwrite: choose another --out")
    if out_dir.is_dir():
        clean_stale(out_dir)
        check_writable(out_dir)
        check_journal(out_dir / SCORES, identity, resume=resume, overwrite=overwrite, kind="evaluation")
    elif resume:
        raise CrdiffError(f"no run in {out_dir} to resume; run without --resume to start one")
    make_folder(out_dir, "for --out")


def results_table(rows: list[dict], specs, variants: list[str], resolutions: list[str]):
    """Table 7's layout: a row per resolution, columns metric x variant, the best variant in bold."""
    from rich.table import Table

    from crdiff_cli.evaluation.metrics import LABELS
    from crdiff_cli.evaluation.report import best_variants

    best = best_variants(rows, specs)
    by = {(r["resolution"], r["metric"], r["variant"]): r for r in rows}
    table = Table(title="crdiff evaluate (mean; best in bold)")
    table.add_column("resolution")
    for s in specs:
        for v in variants:
            table.add_column(f"{LABELS[s.name]} {'↑' if s.higher_is_better else '↓'}\n{v}", justify="right")
    for res in resolutions:
        cells = []
        for s in specs:
            for v in variants:
                r = by.get((res, s.name, v))
                text = "" if r is None else f"{r['mean']:.4g}"
                cells.append(f"[bold]{text}[/]" if (res, s.name, v) in best else text)
        table.add_row(res, *cells)
    return table


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False)
