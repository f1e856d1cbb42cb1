"""Benchmark: the CR-Diff node's cost per sampling step through ComfyUI's KSampler, and its peak memory.

Variants: the plain model, CR-Diff with ``masks=on-the-fly`` (the default: no extra copy) and with
``masks=copy`` (masked copies made when sampling starts). Each run is a fresh process (this script with
``--child``) that imports ComfyUI, loads the checkpoint, encodes the prompts and samples; it is timed from spawn
to exit (wall and CPU time, peak RSS from ``os.wait4``). Each variant runs at two step counts, and the
difference over the difference in steps is the cost of one step (start-up, loading and decoding cancel). The
checkpoint is read into the page cache before each run, as ``bench_generate_process.py`` does, and why.
Repetitions interleave the variants; ratios to the plain model are taken per repetition, their median reported.
Threads: ``OMP_NUM_THREADS`` in the child, as a user would set it.

Models (seeded random weights, built once into ``--workdir``): ``tiny``, the SD15-detected 44M-parameter UNet of
the test tier (SD1.5's width, two levels); ``sd15``, SD1.5's UNet architecture (860M parameters). Both with
SD1.5's text encoder and the TAESD VAE.

Run with ComfyUI's Python: COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/bench_comfyui.py
       [--models tiny sd15] [--size 64] [--steps 2 12] [--repeats 3] [--threads 1]
(the tiny model's steps are short: give it more of them, e.g. --models tiny --steps 2 42)
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "on-the-fly", "copy")
SD15_UNET = dict(model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def import_comfyui() -> None:
    """Make ComfyUI importable, on the CPU (set before ``comfy.model_management`` is imported)."""
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    from comfy.cli_args import args

    args.cpu = True
    importlib.import_module("utils.extra_config")  # ComfyUI's import order: before nodes


def build(model: str, path: Path) -> None:
    """Write the seeded checkpoint ``model`` to ``path`` (the test tier's builder, with SD1.5's UNet shape for sd15)."""
    import_comfyui()
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import comfyui_models

    comfyui_models.build_checkpoint(path, unet_config=SD15_UNET if model == "sd15" else None)


def child(checkpoint: Path, variant: str, steps: int, size: int) -> None:
    """One sampling run, as a ComfyUI workflow does it: load, encode, (CR-Diff), KSampler, decode."""
    import_comfyui()
    import folder_paths
    import nodes
    import torch

    from crdiff_cli.comfyui.nodes import CRDiff

    folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent))
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint.name)
        positive = nodes.CLIPTextEncode().encode(clip, "a photograph of an astronaut riding a horse")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        if variant != "plain":
            model = CRDiff().patch(model, "custom ratios (down / mid / up)", 0.433, 0.345, 0.3, 1.5, variant)[0]
        latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
        samples = nodes.KSampler().sample(model, 0, steps, 7.5, "euler", "normal", positive, negative, latent)[0]
        nodes.VAEDecode().decode(vae, samples)


def run_once(checkpoint: Path, variant: str, steps: int, size: int, threads: int) -> dict:
    from bench_generate_process import read_into_page_cache

    read_into_page_cache(checkpoint.parent)  # every process loads from the page cache (bench_generate_process.py)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", str(checkpoint), variant, str(steps), str(size)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{variant} {steps} steps failed:\n{stderr.decode()[-3000:]}")
    return {"wall": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss * 1024, "load": os.getloadavg()[0]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    p.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size / 8)")
    p.add_argument("--steps", type=int, nargs=2, default=[2, 12])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("CRDIFF_CACHE", Path.home() / ".cache/crdiff"))
                   / "bench-comfyui")
    a = p.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        raise SystemExit("set COMFYUI_DIR to a ComfyUI checkout and run with its Python")
    commit = subprocess.run(["git", "-C", os.environ["COMFYUI_DIR"], "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"$ python benchmarks/bench_comfyui.py {' '.join(sys.argv[1:])}\nComfyUI {commit}, {os.cpu_count()} cores, "
          f"{a.threads} thread(s), {a.size}x{a.size} px, steps {a.steps[0]} and {a.steps[1]}")
    for model in a.models:
        (a.workdir / model).mkdir(parents=True, exist_ok=True)
    for model in a.models:
        checkpoint = a.workdir / model / f"{model}_sd15_taesd.safetensors"  # one folder each: read whole before a run
        if not checkpoint.exists():
            build(model, checkpoint)
        per_step: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rep in range(a.repeats):
            order = VARIANTS[rep % 3:] + VARIANTS[: rep % 3]
            for variant in order:
                short, long = (run_once(checkpoint, variant, s, a.size, a.threads) for s in a.steps)
                n = a.steps[1] - a.steps[0]
                per_step[variant].append({"wall": (long["wall"] - short["wall"]) / n,
                                          "cpu": (long["cpu"] - short["cpu"]) / n,
                                          "rss": max(short["rss"], long["rss"]), "load": short["load"]})
                print(f"  {model} rep {rep + 1} {variant}: {per_step[variant][-1]['cpu']:.3f} s/step CPU, "
                      f"load {short['load']:.1f}", file=sys.stderr, flush=True)
        plain = per_step["plain"]
        print(f"\n{model}: | variant | CPU per step | vs plain (range) | wall vs plain | peak RSS | vs plain |")
        print("|---|---:|---:|---:|---:|---:|")
        for variant, runs in per_step.items():
            cpu = [r["cpu"] / p["cpu"] for r, p in zip(runs, plain)]
            wall = statistics.median(r["wall"] / p["wall"] for r, p in zip(runs, plain))
            rss = max(r["rss"] for r in runs)
            print(f"| {variant} | {statistics.median(r['cpu'] for r in runs):.3f} s | {statistics.median(cpu):.2f}x "
                  f"({min(cpu):.2f}-{max(cpu):.2f}) | {wall:.2f}x | {rss / 2**30:.2f} GiB | "
                  f"{rss / max(p['rss'] for p in plain):.3f}x |")


if __name__ == "__main__":
    main()
