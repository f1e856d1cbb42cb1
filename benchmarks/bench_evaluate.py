"""Benchmark: `crdiff evaluate`'s bookkeeping and --batch-size, on the SD1.5 UNet architecture (random weights), CPU.

Targets:
  (1) bookkeeping — everything but generating and metric-model scoring: writing PNGs, the scores journal
      (append + fsync), choosing what is pending, results/paired/report — <= 2% of an image's generation time;
  (2) images per hour with --batch-size 4 vs 1.

The model is bench_search.py's (built once into --workdir, reused): SD1.5's UNet (859.5M) and VAE
architectures with seeded random weights, a 2-layer CLIP text encoder of SD1.5's width, and as metric
``clip:FOLDER`` with a random CLIP ViT-L/14 (ImageReward's size class). In-process, the library's own
functions are timed by wrapping them (generation: ``generate_images``; scoring: each metric's
``score``); bookkeeping is the rest of the run (batches, PNG writes, journal) plus ``finish``. Then the
command itself is run in fresh processes for each batch size (wall time, model loading included).

Usage: python benchmarks/bench_evaluate.py [--workdir DIR] [--res 128x128] [--steps 2] [--prompts 4]
       [--variants pruned,crdiff] [--no-process]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import build  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow", "a bowl of fruit on a table",
           "a lighthouse at dusk", "a city street at night", "a cat on a sofa", "a mountain lake", "a sailing boat"]


def command(pipe_dir, clip_dir, prompts_file, out, args, batch_size) -> list[str]:
    return ["--model", str(pipe_dir), "--res", args.res, "--prompts", str(prompts_file), "--steps", str(args.steps),
            "--variants", args.variants, "--metrics", f"clip:{clip_dir}", "--batch-size", str(batch_size),
            "--ratios", "0.433/0.345/0.3", "--out", str(out)]


def in_process(pipe_dir, clip_dir, prompts_file, tmp: Path, args, batch_size: int) -> dict:
    from typer.testing import CliRunner

    import crdiff_cli.evaluation.metrics as metrics
    import crdiff_cli.evaluation.protocol as evaluate
    import crdiff_cli.pipelines.generation as generate
    from crdiff_cli.cli import app

    spent = {"generate": 0.0, "score": 0.0, "run": 0.0, "finish": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    originals = (generate.generate_images, metrics.ImageMetric.score, evaluate.Session.run, evaluate.finish)
    generate.generate_images = timed("generate", originals[0])
    metrics.ImageMetric.score = timed("score", originals[1])
    evaluate.Session.run = timed("run", originals[2])
    evaluate.finish = timed("finish", originals[3])
    try:
        out = tmp / f"inproc-b{batch_size}"
        result = CliRunner().invoke(app, ["evaluate", *command(pipe_dir, clip_dir, prompts_file, out, args, batch_size)])
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    finally:
        generate.generate_images, metrics.ImageMetric.score, evaluate.Session.run, evaluate.finish = originals
    images = len(args.variants.split(",")) * args.prompts
    bookkeeping = spent["run"] - spent["generate"] - spent["score"] + spent["finish"]
    return {"batch_size": batch_size, "images": images, "generate_s": spent["generate"], "score_s": spent["score"],
            "bookkeeping_s": bookkeeping, "per_image_generate_s": spent["generate"] / images,
            "bookkeeping_pct": 100 * bookkeeping / spent["generate"],
            "images_per_hour_gen_score": 3600 * images / (spent["generate"] + spent["score"] + bookkeeping)}


def whole_process(pipe_dir, clip_dir, prompts_file, tmp: Path, args, batch_size: int) -> dict:
    out = tmp / f"proc-b{batch_size}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crdiff_cli", "evaluate",
                    *command(pipe_dir, clip_dir, prompts_file, out, args, batch_size)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    images = len(args.variants.split(",")) * args.prompts
    return {"batch_size": batch_size, "wall_s": wall, "images_per_hour": 3600 * images / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(Path.home() / ".cache/crdiff/bench-search"))
    parser.add_argument("--res", default="128x128")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--variants", default="pruned,crdiff")
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process runs")
    args = parser.parse_args()
    pipe_dir, clip_dir = build(Path(args.workdir))
    tmp = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    try:
        prompts_file = tmp / "prompts.txt"
        prompts_file.write_text("\n".join(PROMPTS[:args.prompts]) + "\n")
        for b in (1, 4):
            r = in_process(pipe_dir, clip_dir, prompts_file, tmp, args, b)
            print(f"in-process B={b}: {r['images']} images, generation {r['generate_s']:.1f}s "
                  f"({r['per_image_generate_s']:.2f}s/image), scoring {r['score_s']:.1f}s, bookkeeping "
                  f"{r['bookkeeping_s']:.3f}s = {r['bookkeeping_pct']:.2f}% of generation; "
                  f"{r['images_per_hour_gen_score']:.0f} images/h (generate+score+bookkeeping)", flush=True)
        for b in () if args.no_process else (1, 4):
            r = whole_process(pipe_dir, clip_dir, prompts_file, tmp, args, b)
            print(f"whole process B={b}: {r['wall_s']:.1f}s wall (model loading included), "
                  f"{r['images_per_hour']:.0f} images/h", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
