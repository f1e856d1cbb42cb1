"""`crdiff search`: the paper's ratio search (Algorithm 1), resumable, on resident models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from crdiff_cli import defaults
from crdiff_cli.cli.shared import (LORA_HELP, MASKS_HELP, MODEL_HELP, RES_HELP, SCHEDULER_HELP, command, err, out,
                                   start_ranks, warn)
from crdiff_cli.errors import CrdiffError


def parse_bounds(text: str, flag: str, *, ratio: bool) -> tuple[float, float]:
    """``LO:HI`` -> (lo, hi); ratio bounds must lie in [0, 1)."""
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise CrdiffError(f"{flag} {text!r} must be LO:HI, e.g. 0.1:0.8") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise CrdiffError(f"{flag} {text!r}: need finite LO < HI")
    if ratio and not 0 <= lo < hi < 1:
        raise CrdiffError(f"{flag} {text!r}: ratio bounds must lie in [0, 1) (the fraction of weights pruned)")
    if not ratio and lo < 0:
        raise CrdiffError(f"{flag} {text!r}: LO must be >= 0")
    return lo, hi


def parse_init(text: str, bounds: tuple[float, float]) -> tuple[tuple[float, float, float], ...]:
    """``D/M/U[,D/M/U...]`` -> seed ratio sets, each inside ``bounds``."""
    from crdiff_cli.pruning.ratios import Ratios

    seeds = tuple(Ratios.parse(part.strip()).as_tuple() for part in text.split(","))
    for seed in seeds:
        if not all(bounds[0] <= x <= bounds[1] for x in seed):
            raise CrdiffError(f"--init {'/'.join(f'{x:g}' for x in seed)} lies outside --bounds "
                              f"{bounds[0]:g}:{bounds[1]:g}; move it inside or widen the bounds")
    return seeds


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise CrdiffError(f"--image-seeds {text!r} must be comma-separated integers, e.g. 24432 or 1,2,3") from None
    from crdiff_cli.validation import check_seed

    for seed in seeds:
        check_seed("--image-seeds", seed)
    if len(set(seeds)) != len(seeds):
        raise CrdiffError(f"--image-seeds {text!r} repeats a seed; each (prompt, seed) image is scored once")
    return seeds


@command
def search(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    res: str = typer.Option(..., "--res", help=RES_HELP + " The resolution the ratios are searched for."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Profile JSON to write (crdiff-profile/1; use it with "
                                  "--profile PATH). The trace PNG goes next to it as <name>.trace.png."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt: the paper's prompt-specific "
                                         "search (\"Specific CR-Diff\")."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A UTF-8 file, one prompt per line "
                                                "(# comments); the energy is -mean score over all of them."),
    scorer: str = typer.Option("imagereward", "--scorer", help="imagereward[:CHECKPOINT] (reference), clip:MODEL, "
                               "pickscore:MODEL, tiny (offline test scorer) or an installed plugin's name."),
    iters: int = typer.Option(120, "--iters", help="Annealing iterations (reference 120); seeds are extra."),
    steps: int = typer.Option(defaults.STEPS, "--steps", help="Denoising steps per image (reference 30)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the annealer's random moves (same seed, same search; "
                             "reference 42)."),
    image_seeds: str = typer.Option("24432", "--image-seeds", help="Comma-separated generator seeds; one image "
                                    "per prompt and seed (reference: 24432)."),
    init: str = typer.Option("0.3/0.3/0.3", "--init", help="Starting ratio set(s) D/M/U[,D/M/U...]; the best "
                             "one starts the annealing."),
    t_init: float = typer.Option(0.1, "--t-init", help="Initial temperature (reference 0.1)."),
    alpha: float = typer.Option(0.95, "--alpha", help="Cooling factor per iteration, 0 < alpha < 1 (reference 0.95)."),
    restarts: int = typer.Option(2, "--restarts", help="Most restarts (patience rule) or temperature resets "
                                 "(t-floor rule) before stopping (reference 2)."),
    bounds: str = typer.Option("0.1:0.8", "--bounds", help="LO:HI bounds of every ratio, within [0, 1) "
                               "(reference 0.1:0.8)."),
    rule: str = typer.Option("patience", "--rule", help="Stagnation rule: 'patience' (the reference code's loop, "
                             "move for move: reheat or restart after max(5, 20% of iters) iterations without a new "
                             "best) or 't-floor' (the paper's Algorithm 1: reset T when it falls below 1e-3)."),
    k: Optional[float] = typer.Option(None, "--k", help="Score with POA at this k (dense + pruned UNet). Default: "
                                      "the pruned model alone, as the reference. With --search-k: k's start value "
                                      f"(default {defaults.K:g})."),
    search_k: bool = typer.Option(False, "--search-k", help="Also anneal k (POA on) as a 4th coordinate within "
                                  "--k-bounds. Goes beyond the paper."),
    k_bounds: str = typer.Option("1.0:2.0", "--k-bounds", help="LO:HI bounds of k for --search-k."),
    search_window: bool = typer.Option(False, "--search-window", help="Also anneal where POA stops: POA on the "
                                       "first STOP of the steps, dense after (--poa-interval 0:STOP), starting at "
                                       "full POA. Needs --k or --search-k. Goes beyond the paper."),
    window_bounds: str = typer.Option("0.1:1.0", "--window-bounds", help="LO:HI bounds of STOP for --search-window."),
    fail_score: float = typer.Option(-2.0, "--fail-score", help="Score of an image whose generation or scoring "
                                     "fails; the candidate's other images keep theirs (reference -2.0)."),
    guidance: float = typer.Option(defaults.GUIDANCE, "--guidance", help="Classifier-free guidance scale."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt (reference: \"\", "
                                        "recorded in the profile)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    journal: Optional[Path] = typer.Option(None, "--journal", help="JSONL journal of every step (default: "
                                           "<out name>.journal.jsonl next to --out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search recorded in the journal (same "
                                "model, resolution, prompts, scorer and settings required)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: replace an existing journal, profile "
                                   "and trace."),
    masks: str = typer.Option(defaults.MASKS, "--masks", help=MASKS_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (fp16 is for GPUs)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ... (model and scorer)."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", metavar="PATH[:SCALE]", help=LORA_HELP + " Part of the journal's identity."),
):
    """Search block-wise pruning ratios for a resolution by simulated annealing (CR-Diff Algorithm 1).

    Each candidate D/M/U re-thresholds the resident UNet, generates one image per prompt and image
    seed, and scores them; energy = -mean score. Every step is journaled, so a killed search continues
    with --resume. Writes the best ratios as a profile (resolution HEIGHTxWIDTH) and a trace PNG.

    Many GPUs: torchrun --nproc-per-node N -m crdiff_cli search ... splits each candidate's images across
    the ranks; the result is the single-process one (docs/distributed.md).
    """
    from crdiff_cli.dual.options import MASK_MODES, check_k
    from crdiff_cli.pipelines.generation import GenerationSettings
    from crdiff_cli.pipelines.loading import torch_dtype
    from crdiff_cli.pipelines.lora import prepare_loras
    from crdiff_cli.pipelines.prompts import read_prompts
    from crdiff_cli.pruning.profile_table import PROFILE
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.scorers import known_scorers
    from crdiff_cli.search.annealing import AnnealConfig
    from crdiff_cli.search.runner import (DEFAULT_K_START, SearchPlan, default_trace_path, k_search_config,
                                          window_search_config)
    from crdiff_cli.search.trace_plot import TRACE
    from crdiff_cli.storage.atomic import check_output
    from crdiff_cli.storage.journal import check_journal, default_journal_path
    from crdiff_cli.validation import check_device, check_prompt

    resolution = Resolution.parse(res)
    if (prompt is None) == (prompts_file is None):
        raise CrdiffError("pass exactly one of --prompt TEXT or --prompts FILE")
    prompts = [check_prompt("--prompt", prompt)] if prompt is not None else read_prompts(prompts_file)
    check_prompt("--negative-prompt", negative_prompt, empty_ok=True)
    lo_hi = parse_bounds(bounds, "--bounds", ratio=True)
    seeds = parse_init(init, lo_hi)
    for flag, value, ok, need in (("--iters", iters, iters >= 1, ">= 1"),
                                  ("--alpha", alpha, 0 < alpha < 1, "in (0, 1), e.g. 0.95"),
                                  ("--t-init", t_init, t_init > 0, "> 0, e.g. 0.1"),
                                  ("--restarts", restarts, restarts >= 0, ">= 0"),
                                  ("--fail-score", fail_score, math.isfinite(fail_score), "finite")):
        if not ok:
            raise CrdiffError(f"{flag} {value:g}: must be {need}")
    if rule not in ("patience", "t-floor"):
        raise CrdiffError(f"--rule {rule!r}: choose patience or t-floor")
    if masks not in MASK_MODES:
        raise CrdiffError(f"--masks {masks!r}: choose one of {', '.join(MASK_MODES)}")
    warning = check_k(k) if k is not None else None
    if scorer.partition(":")[0].strip() not in known_scorers():
        raise CrdiffError(f"unknown scorer {scorer!r}; known scorers: {', '.join(known_scorers())}")
    config = AnnealConfig(t_init=t_init, alpha=alpha, iters=iters, seeds=seeds, bounds=(lo_hi,) * 3, rule=rule,
                          max_restarts=restarts, seed=seed)
    if search_k:
        k_lo_hi = parse_bounds(k_bounds, "--k-bounds", ratio=False)
        k_start = DEFAULT_K_START if k is None else k
        if not k_lo_hi[0] <= k_start <= k_lo_hi[1]:
            raise CrdiffError(f"k start {k_start:g} lies outside --k-bounds {k_bounds}; pass --k inside the bounds")
        config = k_search_config(config, k_lo_hi, k_start)
    if search_window:
        if k is None and not search_k:
            raise CrdiffError("--search-window searches where POA runs; pass --k K (or --search-k) to turn POA on")
        window_lo_hi = parse_bounds(window_bounds, "--window-bounds", ratio=False)
        if not 0 < window_lo_hi[0] <= window_lo_hi[1] <= 1:
            raise CrdiffError(f"--window-bounds {window_bounds} must lie within (0, 1] (fractions of the steps)")
        config = window_search_config(config, window_lo_hi, window_lo_hi[1])
    settings = GenerationSettings(resolution, steps, guidance, negative_prompt, scheduler)
    loras = prepare_loras(lora, model)
    label = _model_label(model) + "".join(f" + lora {x.label}" for x in loras)
    plan = SearchPlan(tuple(prompts), settings, config, parse_seeds(image_seeds), None if search_k else k, search_k,
                      fail_score, search_window, model=label, dtype=str(torch_dtype(dtype)).removeprefix("torch."))
    journal = journal or default_journal_path(out_path)
    trace_path = default_trace_path(out_path)
    check_device(device)
    ranks = start_ranks(device)
    ranks.on_main(lambda: (check_output(out_path, overwrite or resume, PROFILE),  # files live on rank 0's machine
                           check_journal(journal, None, resume=resume, overwrite=overwrite),
                           check_output(trace_path, overwrite or resume, TRACE)))
    if warning:
        warn(warning)
    _run(plan, scorer, journal, out_path, trace_path, resume=resume, overwrite=overwrite, masks=masks, dtype=dtype,
         device=device, ranks=ranks, model=model, loras=loras)


def _model_label(model: str) -> str:
    """How the journal and profile name the model: local paths made absolute, so a resume from another
    working directory still matches; tiny names and hub ids as given."""
    from crdiff_cli.pipelines.tiny import TINY_MODELS

    path = Path(model).expanduser()
    return model if model in TINY_MODELS or not path.exists() else str(path.resolve())


def _run(plan, scorer_spec: str, journal: Path, out_path: Path, trace_path: Path, *, resume: bool, overwrite: bool,
         masks: str, dtype: str, device: str, ranks, model: str, loras: list) -> None:
    """Load the scorer, check the journal's identity, load the model, search with the live view, write outputs.

    The scorer loads first: the journal records its canonical name (e.g. an absolute checkpoint path),
    and a mismatch should fail before the expensive model load.
    """
    from dataclasses import replace

    from crdiff_cli.cli.search_view import SearchView
    from crdiff_cli.pipelines.prepare import load_prepared
    from crdiff_cli.runtime.distributed import RankFailure
    from crdiff_cli.scorers import load_scorer
    from crdiff_cli.search.runner import save_result, search
    from crdiff_cli.storage.journal import check_journal

    with err.status(f"loading scorer {scorer_spec}"):
        scorer = load_scorer(scorer_spec, device=ranks.device(device))
    plan = replace(plan, scorer=scorer.name)
    ranks.on_main(lambda: check_journal(journal, plan.identity(), resume=resume, overwrite=overwrite))
    with err.status(f"loading {plan.model}"):
        loaded = load_prepared(model, dtype=dtype, device=ranks.device(device), loras=loras)
    from crdiff_cli.storage.atomic import write_errors

    try:
        label = "D/M/U" + "/k" * plan.search_k + "/stop" * plan.search_window
        with SearchView(err, plan.config.iters, label) as view, write_errors(journal):
            result = search(loaded, scorer, plan, journal=journal, resume=resume, overwrite=overwrite, masks=masks,
                            on_eval=view.update, ranks=ranks)
    except KeyboardInterrupt:
        err.print(f"interrupted; every finished step is in {journal}: add --resume to continue")
        raise typer.Exit(130) from None
    except RankFailure as exc:
        raise RankFailure(f"{exc}; every finished step is in {journal}: add --resume to continue") from None
    if not ranks.is_main:
        return
    save_result(result, out_path, trace_path)
    if result.failures:
        first = next(e.error for e in result.history if e.error)
        warn(f"{result.failures} candidates failed and scored {plan.fail_score:g} (first: {first})")
    k_text = f", k {result.k:.4f}" if plan.search_k else ""
    k_text += f", POA window {result.poa.interval_text()}" if plan.search_window else ""
    out.print(f"best ratios {result.ratios} (D/M/U){k_text}: score {result.score:.4f} after {len(result.history)} "
              f"steps ({result.computed} scored, stop: {result.stop_reason}); wrote {out_path} and {trace_path}")
