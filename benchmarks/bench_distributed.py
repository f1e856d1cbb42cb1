"""Benchmark: `crdiff generate`, `evaluate` and `search` under torchrun, 2 ranks vs 1, on the SD1.5 UNet architecture.

Targets: with 2 ranks of 1 thread each against 1 rank of 1 thread, >= 1.8x images per hour
(generate, evaluate) and >= 1.8x evaluations per hour (search); communication and coordination <= 1% of an
evaluation's time.

Whole-process runs of the commands themselves, as users run them (OMP_NUM_THREADS=1 for both sides;
torchrun sets the same for its workers): ``python -m crdiff_cli ...`` against
``python -m torch.distributed.run --standalone --nproc-per-node 2 -m crdiff_cli ...``. The model is
bench_search's (SD1.5 UNet and VAE architectures, random weights, a 2-layer text encoder; built once in
``--workdir``). Throughput is steady state, so that model loading (the same on every rank, once per
run) does not count:

* generate: images per hour from the PNG files' modification times, first file to last (rank 0 writes
  one round of 2 images at a time under torchrun, 1 image at a time in one process);
* evaluate: the same for `crdiff evaluate --variants crdiff --metrics tiny --batch-size 1` (one batch of
  one image per rank per round; scores.jsonl appended by rank 0), files and scores.jsonl compared;
* search: evaluations per hour from the journal (each step's wall time on rank 0, ``seconds.total``),
  scored with the ``tiny`` scorer (each rank scores the images it made; see docs/distributed.md);
* exchange: the collectives of one search evaluation alone (gather of its images at the benchmark
  resolution, broadcast of the scores), timed in a torchrun worker without any model, against the
  evaluation's time.

Usage: python benchmarks/bench_distributed.py [--res 128x128] [--steps 4] [--images 8] [--iters 3] [--prompts 2]
       [--only generate|evaluate|search]
Runtime on 2 free CPU cores: ~10 minutes, plus the model build the first time. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import build  # noqa: E402  (the same SD1.5-architecture pipeline)

PROMPTS = ("a photograph of an astronaut riding a horse", "a lighthouse at night")
RATIOS = "0.3/0.3/0.3"

EXCHANGE_WORKER = '''
import sys, time
import numpy as np
from PIL import Image
from crdiff_cli.runtime.distributed import start

height, width, images, repeats = (int(x) for x in sys.argv[1:5])
ranks = start("cpu")
rng = np.random.default_rng(ranks.rank)
pairs = list(range(images))
made = lambda share: [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in share]
ranks.split(pairs, made, lambda ims: [0.0] * len(ims))  # warm-up: connections
start_t = time.perf_counter()
for _ in range(repeats):
    ranks.split(pairs, made, lambda ims: [0.0] * len(ims))
exchange = (time.perf_counter() - start_t) / repeats
start_t = time.perf_counter()
for _ in range(repeats):
    made(pairs[:images // ranks.world_size])
if ranks.is_main:
    print(exchange - (time.perf_counter() - start_t) / repeats)  # minus making the random images
'''


def launch(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "crdiff_cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "crdiff_cli"]


def run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def generate(args, ranks: int, out: Path) -> dict:
    wall = run([*launch(ranks), "generate", "--model", str(args.pipe), "--res", args.res, "--steps", str(args.steps),
                "--prompt", PROMPTS[0], "-n", str(args.images), "--ratios", RATIOS, "--out", str(out)])
    return {"wall_s": wall, **steady_rate(list(out.glob("0_*.png")), ranks)}


def evaluate(args, ranks: int, out: Path) -> dict:
    wall = run([*launch(ranks), "evaluate", "--model", str(args.pipe), "--res", args.res, "--steps", str(args.steps),
                "--prompt", PROMPTS[0], "-n", str(args.images), "--variants", "crdiff", "--ratios", RATIOS,
                "--metrics", "tiny", "--out", str(out)])
    return {"wall_s": wall, **steady_rate(list(out.rglob("*.png")), ranks)}


def steady_rate(images: list[Path], ranks: int) -> dict:
    """Images per hour from the files' modification times, from the end of the first round to the last."""
    times = sorted(p.stat().st_mtime for p in images)
    first_round = ranks  # the first round's files are written together: start the clock there
    per_hour = 3600 * (len(times) - first_round) / (times[-1] - times[first_round - 1])
    return {"images": len(times), "images_per_hour": per_hour}


def search(args, ranks: int, folder: Path) -> dict:
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:args.prompts]) + "\n")
    wall = run([*launch(ranks), "search", "--model", str(args.pipe), "--res", args.res, "--steps", str(args.steps),
                "--scorer", "tiny", "--prompts", str(prompts), "--image-seeds", "1,2", "--iters", str(args.iters),
                "--out", str(folder / "best.json")])
    lines = (folder / "best.journal.jsonl").read_text().splitlines()[1:]
    steps = [json.loads(line) for line in lines]
    totals = [s["seconds"]["total"] for s in steps if not s["cached"]]
    return {"wall_s": wall, "evaluations": len(steps), "eval_s": statistics.median(totals),
            "evals_per_hour": 3600 / statistics.median(totals), "entries": [
                {k: v for k, v in s.items() if k not in ("seconds", "state")} for s in steps]}


def exchange(args, images: int) -> float:
    height, width = (int(x) for x in args.res.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "exchange.py"
        worker.write_text(EXCHANGE_WORKER)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
               str(height), str(width), str(images), "20"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", default="128x128", help="HEIGHTxWIDTH")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=8, help="images of the generate and evaluate runs")
    p.add_argument("--iters", type=int, default=3, help="search iterations")
    p.add_argument("--prompts", type=int, choices=(1, 2), default=2, help="search prompts (x 2 image seeds)")
    p.add_argument("--only", choices=("generate", "evaluate", "search"), help="run one of the three parts")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("CRDIFF_CACHE", Path.home() / ".cache/crdiff"))
                   / "bench-search")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.pipe, _ = build(args.workdir)
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only in (None, "generate"):
            gen = {r: generate(args, r, tmp / f"gen{r}") for r in (1, 2)}
            same = all((tmp / "gen1" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "gen2").iterdir())
            print(f"load average after generate: {os.getloadavg()}")
        if args.only in (None, "evaluate"):
            ev = {r: evaluate(args, r, tmp / f"eval{r}") for r in (1, 2)}
            ev_same = all((tmp / "eval1" / f.relative_to(tmp / "eval2")).read_bytes() == f.read_bytes()
                          for f in (tmp / "eval2").rglob("*") if f.is_file())
            print(f"load average after evaluate: {os.getloadavg()}")
        if args.only in (None, "search"):
            for r in (1, 2):
                (tmp / f"search{r}").mkdir()
            found = {r: search(args, r, tmp / f"search{r}") for r in (1, 2)}
            comm = exchange(args, 2 * args.prompts)
            print(f"load average after search: {os.getloadavg()}")
    if args.only in (None, "generate"):
        report_images("generate", args, gen, same)
    if args.only in (None, "evaluate"):
        report_images("evaluate", args, ev, ev_same)
    if args.only in (None, "search"):
        report_search(args, found, comm)


def report_images(command: str, args, gen: dict, same: bool) -> None:
    print(f"\n{command} ({args.res} HxW, {args.steps} steps, CR-Diff k=1.5, {args.images} images; whole runs):")
    for r, g in gen.items():
        print(f"  {r} rank(s): {g['images_per_hour']:.0f} images/hour (wall {g['wall_s']:.0f} s with loading)")
    print(f"  speed-up {gen[2]['images_per_hour'] / gen[1]['images_per_hour']:.2f}x (target >= 1.8x); "
          f"files identical: {same}")


def report_search(args, found: dict, comm: float) -> None:
    print(f"\nsearch ({args.res}, {args.steps} steps, {args.prompts} prompt(s) x 2 image seeds, {args.iters} "
          f"iterations, tiny scorer):")
    for r, s in found.items():
        print(f"  {r} rank(s): {s['evals_per_hour']:.0f} evaluations/hour (median evaluation {s['eval_s']:.2f} s; "
              f"wall {s['wall_s']:.0f} s with loading)")
    ideal = found[1]["eval_s"] / 2
    print(f"  speed-up {found[2]['evals_per_hour'] / found[1]['evals_per_hour']:.2f}x (target >= 1.8x); "
          f"journals identical: {found[1]['entries'] == found[2]['entries']}")
    print(f"  2-rank evaluation {found[2]['eval_s']:.2f} s vs half the 1-rank one {ideal:.2f} s: overhead "
          f"{100 * (found[2]['eval_s'] - ideal) / found[2]['eval_s']:.1f}% (exchange, imbalance, re-masking on every rank)")
    print(f"  exchange alone (gather {2 * args.prompts} images of {args.res}, broadcast scores): {1000 * comm:.1f} ms = "
          f"{100 * comm / found[2]['eval_s']:.2f}% of a 2-rank evaluation (target <= 1%)")


if __name__ == "__main__":
    main()
