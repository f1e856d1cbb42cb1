"""Benchmark: `crdiff generate` as users run it, whole process, on the real SD1.5 UNet architecture.

The whole-process targets: peak RSS of any CR-Diff variant <= 1.25x ``--dense``'s, and per denoising step,
CR-Diff (k = 1.5, default mask mode) costs <= 2.05x ``--dense``
(two UNet passes are the floor) and ``--k 0 --ratios ...`` (the dual UNet built, only its dense pass
run) <= 1.05x ``--dense``, at 8x8 and 32x32 latents (64x64 and 256x256 images) with 1 and 2 threads.
POA policies (``--variants window-0.3 refresh-4``: ``--poa-interval 0:0.3``, ``--poa-refresh 4``) must
cost within 5% of their cost model, the UNet passes they run per step (:func:`cost_model`).

The model is the diffusers folder that ``bench_search.py`` writes once (SD1.5 UNet architecture with
``torch.manual_seed(0)`` random weights, the SD VAE architecture, a 2-layer CLIP text encoder of SD1.5's
width and crdiff's byte-level tokenizer): ``crdiff generate --model FOLDER`` loads it as any local model.

How it is measured: each run is a fresh ``crdiff`` process (the console script of this environment,
nothing pinned: the process sets up its allocator as every user's does), timed from spawn to exit: wall
time, CPU time, minor page faults and peak RSS from ``os.wait4``. Each variant runs at two step counts;
the difference divided by the difference in steps is the cost of one step, so start-up, loading,
pruning, text encoding and the VAE cancel. Repetitions interleave the variants (their order rotates);
a variant's ratio to ``--dense`` is taken within each repetition and the median over repetitions is
reported, with the load average before each run. The targets are checked on CPU time, which waiting
for a core does not inflate (on a quiet machine wall and CPU ratios agree; on a shared one only the
CPU ratio means anything). Threads: ``OMP_NUM_THREADS`` in the child's
environment, as a user would set it (torch's own default here is 2, the number of cores).

Page cache: right before each run the model folder's files are read once, so every process finds them in
the page cache. This machine's kernel pages out memory left unread for a minute (DAMON ``pageout`` on
physical memory), so without it a process reads some unknown part of the 3.4 GB UNet from disk (a cold read
of it takes ~10 s, mostly kernel CPU time, a warm one 0.5 s) and that varies between the two processes whose
difference is the per-step figure. The read changes nothing inside the process but where loading reads
from; a user generating again with the same model has it cached just the same. Major page faults are
reported to show it. ``--cold`` leaves the cache as it is, for comparison. The same eviction reaches
Python's and torch's own files after a pause, so each configuration starts with one unmeasured 1-step
process (a first process after 15 idle minutes had 400 major faults, and its
repetition's dense per-step figure came out 40% low in wall time, 13% in CPU time).

Limit: the subtraction still carries the process-to-process variation of everything before the first
step into the per-step figure; ``probe_generate_steps.py`` times the steps inside one such process, which
separates the two (docs/benchmarks.md, "Whole process").

Usage: python benchmarks/bench_generate_process.py [--latents 8 32] [--threads 1 2] [--steps 2 52]
       [--repeats 3] [--variants dense k0 crdiff crdiff-on-the-fly k0-on-the-fly window-0.3 refresh-4]
       [--glibc-defaults] [--cold]
Steps: by default 2 and 52 at 8x8, 2 and 12 at larger latents (about a minute of dense steps on one
thread either way: enough here for repetitions to agree within a few percent, except at 32x32 with
2 threads, docs/benchmarks.md).
Runtime on 2 quiet cores, 3 repetitions: 8x8 about 16 minutes per thread count; 32x32 about 27
minutes on one thread, 20-30 on two (6-10 minutes per repetition).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATIOS = "0.433/0.345/0.3"  # profile sd15@512x512
PROMPT = "a photograph of an astronaut riding a horse"
VARIANTS = {
    "dense": ["--dense"],
    "k0": ["--k", "0", "--ratios", RATIOS],
    "crdiff": ["--ratios", RATIOS],
    "k0-on-the-fly": ["--k", "0", "--ratios", RATIOS, "--masks", "on-the-fly"],
    "crdiff-on-the-fly": ["--ratios", RATIOS, "--masks", "on-the-fly"],
    "window-0.3": ["--ratios", RATIOS, "--poa-interval", "0:0.3"],
    "refresh-4": ["--ratios", RATIOS, "--poa-refresh", "4"],
}
TARGETS = {"k0": 1.05, "crdiff": 2.05, "k0-on-the-fly": 1.05, "crdiff-on-the-fly": 2.05}
# POA policies: their per-step cost must be within 5% of the cost model, UNet passes per step relative to dense
# (1 + f for a window covering a fraction f of the steps, 1 + 1/N for refresh N), counted exactly for the two
# step counts by PoaPolicy.passes (with 2 and 52 steps: 1.30x and 1.24x).
POLICIES = {"window-0.3": ("0:0.3", 1), "refresh-4": ("0:1", 4)}
POLICY_TOLERANCE = 0.05


def cost_model(name: str, steps: tuple[int, int]) -> float:
    """UNet passes per step of a policy variant, relative to dense, between the two step counts."""
    from crdiff_cli.dual.poa_policy import PoaPolicy

    interval, refresh = POLICIES[name]
    policy = PoaPolicy.parse(interval, "dense", refresh)
    return (policy.passes(steps[1]) - policy.passes(steps[0])) / (steps[1] - steps[0])
RSS_TARGET = 1.25  # peak RSS of a CR-Diff process (default copy masks) vs a --dense one
# GLIBC_TUNABLES set to glibc's own default makes crdiff leave malloc alone (crdiff_cli.runtime.malloc_tuning):
# the process then allocates as it did before crdiff tuned it.
GLIBC_DEFAULTS = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}


def crdiff_command() -> list[str]:
    """The ``crdiff`` console script installed next to this interpreter (what users run)."""
    script = Path(sys.executable).with_name("crdiff")
    return [str(script)] if script.exists() else [sys.executable, "-m", "crdiff_cli"]


def read_into_page_cache(folder: Path) -> None:
    """Read every file of ``folder`` once, so the next process loads the model from the page cache."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def run_once(pipe_dir: Path, latent: int, threads: int, steps: int, flags: list[str], extra_env: dict,
             warm: bool) -> dict:
    """One ``crdiff generate`` process: wall s, CPU s, minor and major faults, peak RSS bytes, load before."""
    if warm:
        read_into_page_cache(pipe_dir)
    out = Path(tempfile.mkdtemp(prefix="crdiff-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", **extra_env}
    cmd = [*crdiff_command(), "generate", "--model", str(pipe_dir), "--res", f"{8 * latent}x{8 * latent}",
           "--prompt", PROMPT, "--steps", str(steps), "--seed", "0", "--out", str(out), *flags]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{stderr.decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "faults": usage.ru_minflt,
            "major_faults": usage.ru_majflt, "rss": usage.ru_maxrss * 1024, "load": load}


def per_step(short: dict, long: dict, steps: tuple[int, int]) -> dict:
    """Cost of one step: the difference between two step counts over the difference in steps."""
    n = steps[1] - steps[0]
    return {key: (long[key] - short[key]) / n for key in ("wall", "cpu", "faults")} | {
        "rss": max(short["rss"], long["rss"]), "load": (short["load"], long["load"])}


def measure(pipe_dir, latent, threads, steps, variants, repeats, extra_env, warm) -> dict[str, list[dict]]:
    """Per variant, one per-step record per repetition; variants interleaved, order rotated each repetition."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    run_once(pipe_dir, latent, threads, 1, VARIANTS["dense"], extra_env, warm)  # unmeasured: see the docstring
    for rep in range(repeats):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for name in order:
            runs = [run_once(pipe_dir, latent, threads, s, VARIANTS[name], extra_env, warm) for s in steps]
            results[name].append(per_step(*runs, steps))
            print(f"  rep {rep + 1} {name}: {results[name][-1]['wall']:.2f} s/step wall, "
                  f"{results[name][-1]['cpu']:.2f} s/step CPU, load {runs[0]['load']:.1f}, "
                  f"major faults {runs[0]['major_faults']} / {runs[1]['major_faults']}", file=sys.stderr, flush=True)
    return results


def report(latent: int, threads: int, results: dict[str, list[dict]], repeats: int,
           steps: tuple[int, int]) -> list[tuple[str, bool]]:
    """Print one markdown table; return the target checks."""
    dense = results["dense"]
    loads = [x for runs in results.values() for r in runs for x in r["load"]]
    print(f"\n{latent}x{latent} latent ({8 * latent}x{8 * latent} px), {threads} thread(s), {repeats} repetitions, "
          f"load average {min(loads):.1f}-{max(loads):.1f} before the runs")
    print("\n| variant | wall per step, median | vs --dense (median of per-repetition ratios) | CPU per step, median "
          "| vs --dense (range over repetitions) | minor faults per step | peak RSS | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    checks = []
    for name, runs in results.items():
        wall = statistics.median(r["wall"] / d["wall"] for r, d in zip(runs, dense))
        cpu_ratios = [r["cpu"] / d["cpu"] for r, d in zip(runs, dense)]
        cpu = statistics.median(cpu_ratios)
        target = TARGETS.get(name)
        model = cost_model(name, steps) if name in POLICIES else None
        target_text = f"<= {target}x" if target else f"{model:.2f}x +-{POLICY_TOLERANCE:.0%}" if model else ""
        print(f"| `{' '.join(VARIANTS[name])}` | {statistics.median(r['wall'] for r in runs):.2f} s | {wall:.2f}x | "
              f"{statistics.median(r['cpu'] for r in runs):.2f} s | {cpu:.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}) | "
              f"{statistics.median(r['faults'] for r in runs):,.0f} | {max(r['rss'] for r in runs) / 2**30:.2f} GiB | "
              f"{target_text} |")
        if target:
            text = f"{latent}x{latent}, {threads} thread(s): {name} {cpu:.2f}x CPU (wall {wall:.2f}x) <= {target}x"
            checks.append((text, cpu <= target))
        if model:
            text = (f"{latent}x{latent}, {threads} thread(s): {name} {cpu:.2f}x CPU (wall {wall:.2f}x) within "
                    f"{POLICY_TOLERANCE:.0%} of the cost model {model:.2f}x")
            checks.append((text, abs(cpu / model - 1) <= POLICY_TOLERANCE))
        if name != "dense":
            rss = max(r["rss"] for r in runs) / max(d["rss"] for d in dense)
            checks.append((f"{latent}x{latent}, {threads} thread(s): {name} peak RSS {rss:.3f}x --dense's "
                           f"<= {RSS_TARGET}x", rss <= RSS_TARGET))
    return checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, nargs="+", default=[8, 32], help="latent sides (image = 8x)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, nargs=2, help="the two step counts (default: 2 52 at 8x8, 2 12 above)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["dense", "k0", "crdiff"], choices=list(VARIANTS))
    p.add_argument("--glibc-defaults", action="store_true",
                   help="run crdiff with glibc malloc's defaults (as before malloc tuning), for comparison")
    p.add_argument("--cold", action="store_true",
                   help="leave the page cache as it is (do not read the model into it before each run)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("CRDIFF_CACHE", Path.home() / ".cache/crdiff"))
                   / "bench-search")
    args = p.parse_args()
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_search import build_pipeline

    pipe_dir = build_pipeline(args.workdir)
    print("$ python benchmarks/bench_generate_process.py " + " ".join(sys.argv[1:]))
    print(f"crdiff: {' '.join(crdiff_command())}; {os.cpu_count()} CPU cores; "
          f"glibc malloc {'at its defaults' if args.glibc_defaults else 'as crdiff sets it'}; "
          f"model {'left as the page cache has it' if args.cold else 'read into the page cache before each run'}")
    checks = []
    for latent in args.latents:
        steps = tuple(args.steps or ((2, 52) if latent <= 8 else (2, 12)))
        print(f"{latent}x{latent} latent: steps {steps[0]} and {steps[1]}")
        for threads in args.threads:
            results = measure(pipe_dir, latent, threads, steps, args.variants, args.repeats,
                              GLIBC_DEFAULTS if args.glibc_defaults else {}, not args.cold)
            checks += report(latent, threads, results, args.repeats, steps)
    print()
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")


if __name__ == "__main__":
    main()
