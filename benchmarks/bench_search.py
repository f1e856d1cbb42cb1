"""Benchmark: the ratio search's cost per evaluation on the SD1.5 UNet architecture (random weights), CPU.

Targets:
  (1) time per evaluation minus generation and scoring (re-thresholding, re-masking, journal fsync,
      bookkeeping) <= 2% of the evaluation;
  (2) evaluations per hour >= 3x a reference-style loop that, for every evaluation, starts a fresh
      Python process, loads the pipeline from a saved folder, deep-copies it (as the reference code does),
      prunes the copy (per group
      ``torch.cat([|w| ...]).kthvalue(m)``, then ``masked_fill_``), loads the scorer, generates and scores.

The model (no download possible here): a diffusers StableDiffusionPipeline whose UNet is the SD1.5
architecture (859.5M parameters, seeded random weights), whose VAE is the SD VAE architecture
(83.7M, random), and whose text encoder is a CLIP text transformer of SD1.5's width (hidden 768, so
cross-attention matches) but only 2 layers, with crdiff's byte-level tokenizer. The scorer stands in
for ImageReward (BLIP ViT-L + BERT-base, ~450M): ``clip:FOLDER`` with a random CLIP ViT-L/14 (390M
with crdiff's byte-level vocabulary), saved with ``save_pretrained``. Both are written once to
``--workdir`` (~5.1 GB) and reused.

Both loops run the same generation (crdiff_cli.pipelines.generation.generate_image) and scoring code on the same
candidates, one image per evaluation (one prompt, the reference image seed 24432), so they differ
only in what happens around them. Each side runs in its own fresh process.

Usage: python benchmarks/bench_search.py [--res 128x128] [--steps 4] [--evals 5] [--ref-evals 2]
Runtime on 2 CPU cores shared with other jobs: ~7 minutes (~5 with --res 64x64 --steps 2), plus ~1 minute
to build and save the models the first time. Results and how to read them: docs/benchmarks.md, "Search".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 24432


def build(workdir: Path) -> tuple[Path, Path]:
    """Write the pipeline and scorer folders once; returns their paths."""
    return build_pipeline(workdir), build_scorer(workdir)


def build_pipeline(workdir: Path) -> Path:
    """Write the SD1.5-architecture pipeline folder once (also used by bench_generate_process.py); its path."""
    pipe_dir = workdir / "sd15-arch-random"
    if not (pipe_dir / "model_index.json").exists():
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from crdiff_cli.pipelines.tiny import clip_tokenizer

        torch.manual_seed(0)
        tok = clip_tokenizer()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=2, num_attention_heads=12, projection_dim=768,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=text, tokenizer=tok, unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(pipe_dir, safe_serialization=True)
    return pipe_dir


def build_scorer(workdir: Path) -> Path:
    """Write the random CLIP ViT-L/14 scorer folder once; its path."""
    clip_dir = workdir / "clip-vit-l14-random"
    if not (clip_dir / "config.json").exists():
        import torch
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

        from crdiff_cli.pipelines.tiny import clip_tokenizer
        from crdiff_cli.scorers.clip import _image_processor_class

        torch.manual_seed(1)
        tok = clip_tokenizer()
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14)
        CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=768)
                  ).save_pretrained(clip_dir)
        tok.save_pretrained(clip_dir)
        _image_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
                                 ).save_pretrained(clip_dir)
    return clip_dir


def ours(args) -> dict:
    """One process: load once, then a search of ``evals`` evaluations through crdiff_cli.search.runner."""
    import torch

    from crdiff_cli.pipelines.generation import GenerationSettings
    from crdiff_cli.pipelines.loading import load_model
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.scorers import load_scorer
    from crdiff_cli.search.annealing import AnnealConfig
    from crdiff_cli.search.runner import SearchPlan, search

    t0 = time.perf_counter()
    loaded = load_model(args.pipe)
    scorer = load_scorer(f"clip:{args.clip}")
    loaded_s = time.perf_counter() - t0
    steps, marks = [], [(time.perf_counter(), time.process_time())]

    def on_eval(e):
        marks.append((time.perf_counter(), time.process_time()))
        steps.append({"candidate": list(e.record.candidate), "cached": e.cached, **e.seconds,
                      "step": marks[-1][0] - marks[-2][0], "cpu": marks[-1][1] - marks[-2][1]})

    plan = SearchPlan((PROMPT,), GenerationSettings(Resolution.parse(args.res), steps=args.steps),
                      AnnealConfig(iters=args.evals - 1, seed=args.seed))
    journal = Path(args.workdir) / "bench.journal.jsonl"
    search(loaded, scorer, plan, journal=journal, overwrite=True, on_eval=on_eval)
    finished_at = time.time()
    setup = marks[1][0] - marks[0][0] - steps[0]["total"]  # PruneStats + attaching the dual UNet, once per search
    return {"threads": torch.get_num_threads(), "load_s": loaded_s, "setup_s": setup, "steps": steps,
            "finished_at": finished_at, "schedule": schedule(loaded, args.seed)}


def schedule(loaded, seed: int) -> list[tuple[float, float]]:
    """Re-threshold + re-mask (wall, CPU) seconds of every step of a full default schedule, no images.

    The few real evaluations above are the start of a search, where steps are largest and the rank
    windows miss most; this replays a whole default annealing run on the same UNet with a synthetic
    energy (a bowl around Table 6's sd15@512x512 ratios) to get the cost over a complete search.
    """
    from crdiff_cli.dual.apply import apply_crdiff
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.search.annealing import AnnealConfig, anneal
    from crdiff_cli.search.thresholds import search_stats

    stats = search_stats(loaded.unet)
    dual = apply_crdiff(loaded.pipe, stats.spec(Ratios(0.3, 0.3, 0.3)), k=1.0)
    seconds = []

    def energy(candidate):
        start, cpu = time.perf_counter(), time.process_time()
        dual.set_spec(stats.spec(Ratios(*candidate)))
        seconds.append((time.perf_counter() - start, time.process_time() - cpu))
        return 100 * sum((a - b) ** 2 for a, b in zip(candidate, (0.433, 0.345, 0.300)))

    anneal(energy, AnnealConfig(seed=seed))
    loaded.pipe.unet = dual.release()
    return seconds


def reference_eval(args) -> dict:
    """One evaluation the reference way, in this (fresh) process: load, prune by concat+kthvalue, run."""
    t0 = time.perf_counter()
    import copy

    import torch
    from diffusers import DiffusionPipeline

    from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.pruning.targets import target_weights
    from crdiff_cli.scorers import load_scorer

    t1 = time.perf_counter()
    dense = DiffusionPipeline.from_pretrained(args.pipe)
    pipe = copy.deepcopy(dense)  # as the reference code does: it prunes a deep copy and keeps the dense pipeline
    pipe.set_progress_bar_config(disable=True)
    t2 = time.perf_counter()
    ratios = Ratios.parse(args.ratios)
    with torch.no_grad():
        for group, weights in target_weights(pipe.unet).items():
            flat = torch.cat([p.detach().abs().flatten() for _, p in weights])
            m = int(flat.numel() * ratios[group])
            if m:
                threshold = flat.kthvalue(m).values
                for _, p in weights:
                    p.masked_fill_(p.abs() <= threshold, 0.0)
            del flat
    t3 = time.perf_counter()
    scorer = load_scorer(f"clip:{args.clip}")
    t4 = time.perf_counter()
    image = generate_image(pipe, PROMPT, SEED, GenerationSettings(Resolution.parse(args.res), steps=args.steps))
    t5 = time.perf_counter()
    score = scorer.score([image], [PROMPT])[0]
    t6 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "prune_s": t3 - t2, "scorer_load_s": t4 - t3,
            "generate": t5 - t4, "score": t6 - t5, "score_value": score}


def child(mode: str, args, **extra) -> tuple[dict, float, float]:
    """Run ``mode`` in a fresh process; returns its JSON result, wall time and CPU time, start-up included."""
    cmd = [sys.executable, __file__, "--child", mode, "--pipe", str(args.pipe), "--clip", str(args.clip),
           "--workdir", str(args.workdir), "--res", args.res, "--steps", str(args.steps), "--evals", str(args.evals),
           "--seed", str(args.seed)] + [x for k, v in extra.items() for x in (f"--{k}", v)]
    start, started_at, before = time.perf_counter(), time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "finished_at" in result:  # time to the end of the search (the schedule replay runs after it)
        wall = result["finished_at"] - started_at
    return result, wall, cpu


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def median(xs) -> float:
    return statistics.median(list(xs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", default="128x128", help="HEIGHTxWIDTH")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--evals", type=int, default=5, help="evaluations of our search (seed + neighbours)")
    p.add_argument("--ref-evals", type=int, default=2, help="reference-style evaluations (one process each)")
    p.add_argument("--seed", type=int, default=42, help="the annealer's seed (crdiff search's default, the reference's)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("CRDIFF_CACHE", Path.home() / ".cache/crdiff"))
                   / "bench-search")
    p.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--pipe", help=argparse.SUPPRESS)
    p.add_argument("--clip", help=argparse.SUPPRESS)
    p.add_argument("--ratios", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        if args.child == "ours":  # as `crdiff search` starts (the reference-style loop keeps glibc's defaults)
            from crdiff_cli.runtime.malloc_tuning import reuse_large_blocks

            reuse_large_blocks()
        print(json.dumps(ours(args) if args.child == "ours" else reference_eval(args)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.pipe, args.clip = build(args.workdir)
    print(f"models ready in {time.perf_counter() - t0:.0f} s ({args.workdir}); load average {os.getloadavg()[0]:.2f}")

    run, ours_wall, _ = child("ours", args)
    steps = run["steps"]
    neighbours = [s for s in steps[1:] if not s["cached"]]
    fixed = ours_wall - sum(s["step"] for s in steps) + run["setup_s"]  # start, load, setup: once per search
    print(f"\nours ({run['threads']} threads; {args.res} HxW, {args.steps} steps, 1 image per evaluation): "
          f"process start + load {fixed - run['setup_s']:.1f} s, search setup (PruneStats + dual UNet) "
          f"{run['setup_s']:.1f} s, both once per search")
    print("  step  candidate             prune_s  generate_s  score_s  step_s  step_cpu_s")
    for i, s in enumerate(steps):
        print(f"  {i + 1:4d}  {'/'.join(f'{v:.4f}' for v in s['candidate'])}  {s.get('prune', 0):7.3f}  "
              f"{s.get('generate', 0):10.3f}  {s.get('score', 0):7.3f}  {s['step']:6.2f}  {s['cpu']:10.2f}")
    step, gen, score = (median(s[k] for s in neighbours) for k in ("step", "generate", "score"))
    overheads = [s["step"] - s["generate"] - s["score"] for s in neighbours]
    print(f"  neighbours, median: step {step:.2f} s = generate {gen:.2f} + score {score:.2f} + overhead "
          f"{median(overheads):.3f} (of which journal/bookkeeping {median(o - s['prune'] for o, s in zip(overheads, neighbours)):.3f})")
    print(f"  overhead at the start of a search (largest steps): {100 * median(o / s['step'] for o, s in zip(overheads, neighbours)):.2f}% "
          f"of an evaluation, wall time (target <= 2%)")
    walls, cpus = zip(*run["schedule"])
    step_cpu = median(s["cpu"] for s in neighbours)
    print(f"  whole default schedule ({len(walls)} steps, synthetic energy), re-threshold + re-mask: wall mean "
          f"{mean(walls):.3f} s (median {median(walls):.3f}, max {max(walls):.2f}); CPU mean {mean(cpus):.3f} s "
          f"= {100 * mean(cpus) / step_cpu:.2f}% of an evaluation's CPU time ({step_cpu:.1f} s) (target <= 2%)")

    refs = [child("reference", args, ratios="/".join(str(v) for v in s["candidate"])) + (s,)
            for s in steps[1:1 + args.ref_evals]]
    for result, wall, cpu, s in refs:
        parts = ("import_s", "load_s", "prune_s", "scorer_load_s", "generate", "score")
        print(f"reference eval {'/'.join(map(str, s['candidate']))}: wall {wall:.1f} s = interpreter start "
              f"{wall - sum(result[k] for k in parts):.1f} + imports {result['import_s']:.1f} + load "
              f"{result['load_s']:.1f} + prune {result['prune_s']:.1f} + scorer load {result['scorer_load_s']:.1f} + "
              f"generate {result['generate']:.1f} + score {result['score']:.1f}; CPU {cpu:.1f} s")
    ref_wall, ref_cpu = median(w for _, w, _, _ in refs), median(c for _, _, c, _ in refs)
    spread = fixed / 121
    print(f"\nevaluations/hour, wall: ours {3600 / step:.0f} ({3600 / (step + spread):.0f} with start, load and "
          f"setup spread over 121 evaluations), reference-style {3600 / ref_wall:.0f} -> {ref_wall / step:.2f}x "
          f"({ref_wall / (step + spread):.2f}x)")
    print(f"evaluations per CPU-hour: ours {3600 / step_cpu:.0f}, reference-style {3600 / ref_cpu:.0f} -> "
          f"{ref_cpu / step_cpu:.2f}x (target >= 3x)")
    print(f"python {platform.python_version()}, torch threads {run['threads']}, "
          f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
