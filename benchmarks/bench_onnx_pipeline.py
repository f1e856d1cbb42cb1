"""Benchmark: `crdiff generate --pipeline` (torch-free ONNX Runtime) against the live PyTorch path, whole process.

Targets, on the real SD1.5 UNet architecture (random weights; ``bench_search.py``'s model folder):

- seconds per denoising step of ``crdiff generate --pipeline FOLDER`` within 1.0x of ``crdiff generate --model
  MODEL --ratios R`` (same ratios, k = 1.5, prompt, seed, size);
- the pipeline folder's UNet part (``unet/``: graph + ``model.onnx_data``) <= 1.01x the dense ONNX pipeline's (the
  same bake at k = 0, which exports the dense UNet alone): the masks are computed in-graph, not stored.

Also reported: start to first image (the whole 2-step process, loading included), peak RSS of each process, and
the size of a runtime environment without torch (``requirements-runtime.txt`` + crdiff ``--no-deps``) against one
with crdiff's dependencies (torch CPU build, diffusers, transformers, ...) plus ONNX Runtime, each a fresh venv.

How it is measured, as in ``bench_generate_process.py``: each run is a fresh ``crdiff`` process timed from spawn
to exit (wall, CPU and peak RSS from ``os.wait4``), at two step counts; the difference over the difference in
steps is one step's cost, so loading and decoding cancel. The model files are read into the page cache before
each run. Nothing is pinned: ONNX Runtime and torch each pick their own thread count (both use the 2 cores
here), as they do for a user. Repetitions interleave the two paths; the ratio is taken within each repetition
and the median reported, with the load average.

Usage: python benchmarks/bench_onnx_pipeline.py [--latent 32] [--steps 2 12] [--repeats 3] [--skip-envs]
Runtime on 2 quiet cores: bakes ~6 minutes (once, cached), 3 repetitions at 32x32 ~15 minutes, venvs ~3 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate_process import PROMPT, RATIOS, crdiff_command, read_into_page_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEP_TARGET = 1.0
SIZE_TARGET = 1.01


def bake(model: Path, out: Path, res: str, k: str) -> Path:
    """The pipeline folder of ``model`` at ``res`` and ``k`` (baked once, kept in the work folder)."""
    if not (out / "crdiff.json").exists():
        cmd = [*crdiff_command(), "bake", "--model", str(model), "--res", res, "--ratios", RATIOS, "--k", k,
               "--format", "onnx-pipeline", "--out", str(out), "--no-verify"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def run_once(args: list[str], steps: int, res: str, warm: list[Path]) -> dict:
    """One ``crdiff generate`` process: wall s, CPU s, peak RSS bytes, load average before."""
    import time

    for folder in warm:
        read_into_page_cache(folder)
    out = Path(tempfile.mkdtemp(prefix="crdiff-bench-"))
    cmd = [*crdiff_command(), "generate", *args, "--res", res, "--prompt", PROMPT, "--steps", str(steps), "--seed",
           "0", "--out", str(out)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024, "load": load}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def venv_size(requirements: list[list[str]], workdir: Path, name: str) -> int:
    """Bytes of a fresh venv after ``pip install`` of each argument list in turn."""
    venv = workdir / name
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for args in requirements:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *args], check=True)
    size = folder_bytes(venv)
    shutil.rmtree(venv, ignore_errors=True)
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=32, help="latent side (image = 8x)")
    p.add_argument("--steps", type=int, nargs=2, default=[2, 12])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-envs", action="store_true", help="do not build the two venvs")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("CRDIFF_CACHE", Path.home() / ".cache/crdiff"))
                   / "bench-search")
    args = p.parse_args()
    from bench_search import build_pipeline

    model = build_pipeline(args.workdir)
    res = f"{8 * args.latent}x{8 * args.latent}"
    folder = bake(model, args.workdir / f"pipeline-crdiff-{res}", res, "1.5")
    dense = bake(model, args.workdir / f"pipeline-dense-{res}", res, "0")
    print("$ python benchmarks/bench_onnx_pipeline.py " + " ".join(sys.argv[1:]))
    print(f"{os.cpu_count()} CPU cores; latent {args.latent}x{args.latent} ({res} px); steps {args.steps}")

    paths = {"live": ["--model", str(model), "--ratios", RATIOS], "onnx": ["--pipeline", str(folder)]}
    warm = {"live": [model], "onnx": [folder]}
    results: dict[str, list[dict]] = {name: [] for name in paths}
    run_once(paths["onnx"], 1, res, warm["onnx"])  # unmeasured: brings Python's and the libraries' files in
    for rep in range(args.repeats):
        for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
            short, long = (run_once(paths[name], s, res, warm[name]) for s in args.steps)
            n = args.steps[1] - args.steps[0]
            results[name].append({"wall": (long["wall"] - short["wall"]) / n, "cpu": (long["cpu"] - short["cpu"]) / n,
                                  "start": short["wall"], "rss": max(short["rss"], long["rss"]),
                                  "load": (short["load"], long["load"])})
            r = results[name][-1]
            print(f"  rep {rep + 1} {name}: {r['wall']:.2f} s/step wall, {r['cpu']:.2f} s/step CPU, first image "
                  f"{r['start']:.1f} s, load {short['load']:.1f}", file=sys.stderr, flush=True)

    loads = [x for runs in results.values() for r in runs for x in r["load"]]
    print(f"\n{args.repeats} repetitions, load average {min(loads):.1f}-{max(loads):.1f} before the runs\n")
    print("| path | wall per step | CPU per step | vs live (CPU, median; range) | start to first image "
          f"({args.steps[0]} steps) | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    checks = []
    for name, runs in results.items():
        ratios = [r["cpu"] / live["cpu"] for r, live in zip(runs, results["live"])]
        print(f"| {name} | {statistics.median(r['wall'] for r in runs):.2f} s | "
              f"{statistics.median(r['cpu'] for r in runs):.2f} s | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(r['start'] for r in runs):.1f} s | "
              f"{max(r['rss'] for r in runs) / 2**30:.2f} GiB |")
        if name == "onnx":
            checks.append((f"ORT per step {statistics.median(ratios):.2f}x live (CPU) <= {STEP_TARGET}x",
                           statistics.median(ratios) <= STEP_TARGET))
    unet, dense_unet = folder_bytes(folder / "unet"), folder_bytes(dense / "unet")
    print(f"\nfolder: {folder_bytes(folder) / 2**30:.3f} GiB (unet/ {unet / 2**30:.3f} GiB); dense ONNX pipeline: "
          f"{folder_bytes(dense) / 2**30:.3f} GiB (unet/ {dense_unet / 2**30:.3f} GiB)")
    checks.append((f"UNet part {unet / dense_unet:.4f}x the dense pipeline's <= {SIZE_TARGET}x",
                   unet / dense_unet <= SIZE_TARGET))
    if not args.skip_envs:
        with tempfile.TemporaryDirectory(prefix="crdiff-envs-") as tmp:
            without = venv_size([["-r", str(ROOT / "requirements-runtime.txt")], ["--no-deps", str(ROOT)]],
                                Path(tmp), "runtime")
            with_torch = venv_size([["torch==2.13.0"], [f"{ROOT}[onnx]"]], Path(tmp), "full")
        print(f"\nenvironment: without torch {without / 2**20:,.0f} MiB; with crdiff's dependencies (torch CPU, "
              f"diffusers, transformers, ONNX Runtime) {with_torch / 2**20:,.0f} MiB ({with_torch / without:.1f}x)")
    print()
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")


if __name__ == "__main__":
    main()
