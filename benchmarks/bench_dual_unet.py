"""Benchmark: the dual UNet (POA) on the real SD1.5 UNet architecture (seeded random weights, fp32, CPU).

The dual UNet's targets, measured:

  memory  resident weight bytes of a DualUNet vs the dense UNet: <= 1.25x with ``masks="copy"``,
          <= 1.02x with ``masks="on-the-fly"``. The reference implementation deep-copies the whole
          pipeline (>= 2x); that is shown by measuring ``copy.deepcopy`` of the UNet alone.
  time    one denoising step, i.e. one UNet call on a classifier-free-guidance batch of 2, dual (k = 1.5)
          vs dense, same inputs: <= 2.05x (two UNet passes is the floor).

How memory is measured: ``resident_bytes`` counts every distinct tensor storage a module keeps
(parameters and buffers, shared ones once). As a cross-check that nothing else is allocated, the
process's resident set (``VmRSS``, after ``gc.collect`` and glibc ``malloc_trim``) is read before and
after building each variant. On-the-fly masking also allocates one masked layer at a time during the
pruned pass (a transient, at most the largest target layer), which is not resident weight memory.

How time is measured (see ``measure_time``): ``--repeats`` calls of the plain dense UNet before and
after; in between, per mask mode, a DualUNet attached once and warmed up, then rounds of an identical
plain UNet (a second copy with nothing attached), the dense pass alone, the dual step (k = 1.5) and the
pruned pass alone (k = 1), back to back, so that load from other processes hits them alike and any cost
beyond "two UNet passes" shows in the pruned pass. The checks take, per round, the ratio of two calls
timed in that round (dense pass / plain UNet, dual step / dense pass) and report the median over rounds. Per
variant the median and best wall time and the median CPU time of the process (``time.process_time``,
which leaves out time spent waiting for a core) are reported. Attaching (making the mask copies) is not
timed: it happens once per model load. The process sets glibc malloc up exactly as the ``crdiff`` CLI does
at start-up (``crdiff_cli.runtime.malloc_tuning.reuse_large_blocks``), and nothing else; ``--glibc-defaults``
leaves malloc at glibc's defaults instead (what a Python user importing crdiff gets), for comparison.
``bench_generate_process.py`` measures the same ratios on the ``crdiff generate`` process itself.

Usage: python benchmarks/bench_dual_unet.py [--latent 64] [--repeats 3] [--profile sd15@512x512] [--glibc-defaults]
Runtime on 2 CPU cores: about 2-5 minutes at the default --latent 32 (54 SD1.5 UNet passes), about 5-10
at --latent 64 --repeats 3; longer when other processes share the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import platform
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from crdiff_cli.dual.options import MASK_MODES
from crdiff_cli.dual.unet import DualUNet, resident_bytes
from crdiff_cli.pruning.profile_table import get_profile
from crdiff_cli.pruning.spec import PruneSpec, pruned_weight
from crdiff_cli.pruning.targets import target_weights
from crdiff_cli.runtime.malloc_tuning import reuse_large_blocks

SD15_CONFIG = dict(  # diffusers' UNet2DConditionModel defaults are SD1.5's, except these
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
)
K = 1.5
GiB = 2**30


def rss_bytes() -> int:
    """Resident set size after returning freed memory to the OS (so growth means new live memory)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: RSS may then include freed-but-kept memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure_memory(unet, spec) -> list[dict]:
    """Resident weight bytes (and RSS growth) of the dense UNet, both dual modes and a deep copy."""
    dense = resident_bytes(unet)
    rows = [{"name": "dense UNet", "bytes": dense, "rss": 0, "target": None}]
    for masks, target in zip(MASK_MODES, (1.25, 1.02)):
        before = rss_bytes()
        dual = DualUNet(unet, spec, k=K, masks=masks)
        rows.append({"name": f"DualUNet, masks={masks}", "bytes": resident_bytes(dual), "rss": rss_bytes() - before,
                     "target": f"<= {target}x"})
        dual.release()
        del dual
    before = rss_bytes()
    twin = copy.deepcopy(unet)  # what the reference does (to the whole pipeline)
    rows.append({"name": "reference: deepcopy of the UNet", "bytes": resident_bytes(torch.nn.ModuleList([unet, twin])),
                 "rss": rss_bytes() - before, "target": "(>= 2x)"})
    del twin
    for row in rows:
        row["ratio"] = row["bytes"] / dense
    return rows


def mask_all(spec, unet) -> None:
    """What on-the-fly masking adds to a step: every target weight masked once (as the pruned pass does)."""
    thresholds = spec.thresholds()
    for group, weights in target_weights(unet).items():
        for _, w in weights:
            if thresholds[group] is not None:
                pruned_weight(w, thresholds[group])


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory touched: the allocator's cost shows here)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_time(unet, plain, spec, inputs, repeats: int) -> tuple[dict[str, list[tuple[float, float]]], dict, dict]:
    """(wall, CPU) seconds per variant, each variant's last output (for the checks), minor faults per call.

    Plain dense runs come first and last (to see drift). In between, one block per mask mode: the
    DualUNet stays attached, as in real use (built once, called every step), is warmed up once, and
    each round times back to back ``plain`` (an identical UNet with nothing attached, so the
    comparison with the dense pass is made under the same load), the dense pass alone (the UNet called
    directly: outside the pruned pass it is the plain module), the dual step at k = 1.5, and the
    pruned pass alone (k = 1).
    """
    times: dict[str, list[tuple[float, float]]] = {}
    outputs: dict[str, object] = {}
    page_faults: dict[str, list[int]] = {}

    def timed(name, fn):
        wall, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
        outputs[name] = fn(*inputs)
        times.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
        page_faults.setdefault(name, []).append(minor_faults() - faults)

    with torch.inference_mode():
        unet(*inputs)  # warm-up: oneDNN primitives, allocator
        for _ in range(repeats):
            timed("dense", unet)
            timed("masking", lambda *_: mask_all(spec, unet))
        for masks in MASK_MODES:
            dual = DualUNet(unet, spec, k=K, masks=masks)
            dual(*inputs)  # warm-up
            for _ in range(repeats):
                timed(f"{masks}: plain UNet", plain)
                timed(f"{masks}: dense pass", unet)
                dual.k = K
                timed(masks, dual)
                dual.k = 1.0
                timed(f"{masks}: pruned pass", dual)
            dual.release()
        for _ in range(repeats):
            timed("dense", unet)
    return times, outputs, page_faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256x256 pixels, 64 = 512x512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median and best reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", default="sd15@512x512", help="built-in profile whose ratios are used")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the random UNet and inputs")
    parser.add_argument("--glibc-defaults", action="store_true", help="leave glibc malloc at its defaults "
                        "instead of setting it up as the crdiff CLI does")
    args = parser.parse_args()
    command = "python benchmarks/bench_dual_unet.py" + "".join(
        f" --{k} {getattr(args, k)}" for k in ("latent", "repeats", "threads", "profile", "seed")
        if getattr(args, k) != parser.get_default(k)) + (" --glibc-defaults" if args.glibc_defaults else "")

    tuned = not args.glibc_defaults and reuse_large_blocks()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**SD15_CONFIG).eval().requires_grad_(False)
    spec = PruneSpec.from_unet(unet, get_profile(args.profile).ratios)
    params = sum(p.numel() for p in unet.parameters())
    targets = sum(p.numel() for ws in target_weights(unet).values() for _, p in ws)
    inputs = (torch.randn(2, 4, args.latent, args.latent), torch.tensor(500), torch.randn(2, 77, 768))
    load_before = os.getloadavg()[0]

    memory = measure_memory(unet, spec)
    plain = copy.deepcopy(unet)  # the plain UNet timed in the same rounds as the dense pass
    started = time.perf_counter()
    times, outputs, page_faults = measure_time(unet, plain, spec, inputs, args.repeats)
    elapsed = time.perf_counter() - started

    print(f"$ {command}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average {load_before:.1f} before timing, "
          f"{os.getloadavg()[0]:.1f} after (other processes share the cores); glibc malloc "
          f"{'set up as the crdiff CLI does (malloc_tuning)' if tuned else 'at its defaults'}")
    print(f"UNet: SD1.5 architecture, random weights, {params / 1e6:.1f}M params fp32; targets {targets / 1e6:.1f}M "
          f"({targets / params:.1%}); ratios {spec.ratios} (profile {args.profile}), k = {K}\n")
    print("| weights resident | bytes | vs dense | RSS growth when built | target |")
    print("|---|---:|---:|---:|---|")
    for row in memory:
        print(f"| {row['name']} | {row['bytes'] / GiB:.2f} GiB | {row['ratio']:.3f}x | "
              f"{row['rss'] / GiB:+.2f} GiB | {row['target'] or ''} |")

    median = {name: statistics.median(t for t, _ in runs) for name, runs in times.items()}
    best = {name: min(t for t, _ in runs) for name, runs in times.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in times.items()}
    # Ratios within a mask mode's block are taken against that block's dense pass (timed alongside, so
    # under the same load); the plain dense UNet of the first and last rounds is the reference for the rest.
    ref = {name: f"{name.split(':')[0]}: dense pass" if name.split(":")[0] in MASK_MODES else "dense" for name in times}
    def per_round(name: str, reference: str) -> list[float]:
        """The ratios of two variants' wall times timed in the same round (drift between rounds cancels)."""
        return sorted(t / r for (t, _), (r, _) in zip(times[name], times[reference]))

    def spread(ratios: list[float]) -> str:
        return f"{statistics.median(ratios):.3f}x (rounds: {ratios[0]:.3f}-{ratios[-1]:.3f}, n = {len(ratios)})"

    step_rounds = {m: per_round(m, ref[m]) for m in MASK_MODES}
    pass_rounds = {m: per_round(ref[m], f"{m}: plain UNet") for m in MASK_MODES}
    print(f"\n| one denoising step: UNet call, batch 2 (CFG), {args.latent}x{args.latent} latent, fp32 | "
          "wall runs (s) | median | vs dense | best | vs dense | CPU time, median | vs dense | minor faults, median "
          "| target |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, runs in times.items():
        label = {"dense": "dense UNet (plain, before and after)", "masking": "on-the-fly masking of all targets, once",
                 **{m: f"DualUNet masks={m}, k={K}" for m in MASK_MODES},
                 **{f"{m}: plain UNet": f"plain UNet, in the masks={m} rounds" for m in MASK_MODES}}.get(
                     name, f"DualUNet masks={name}")
        r = ref[name]
        print(f"| {label} | {', '.join(f'{t:.2f}' for t, _ in runs)} | {median[name]:.2f} s | "
              f"{median[name] / median[r]:.2f}x | {best[name]:.2f} s | {best[name] / best[r]:.2f}x | "
              f"{cpu[name]:.2f} s | {cpu[name] / cpu[r]:.2f}x | {statistics.median(page_faults[name]):,.0f} | "
              f"{'<= 2.05x' if name in MASK_MODES else ''} |")
    print("(vs dense: a mask mode's rows against its own block's dense pass, the others against the plain UNet; "
          "the checks below take the median of per-round ratios)")

    ratios = {row["name"]: row["ratio"] for row in memory}
    checks = [(f"copy-mode memory <= 1.25x: {ratios['DualUNet, masks=copy']:.3f}x", ratios["DualUNet, masks=copy"] <= 1.25),
              (f"on-the-fly memory <= 1.02x: {ratios['DualUNet, masks=on-the-fly']:.3f}x",
               ratios["DualUNet, masks=on-the-fly"] <= 1.02),
              *((f"{m} step time <= 2.05x its dense pass (wall, median of per-round ratios): "
                 f"{spread(step_rounds[m])}", statistics.median(step_rounds[m]) <= 2.05) for m in MASK_MODES),
              *((f"{m}: the dense pass through the DualUNet costs the plain UNet's (within 3%, wall, median of "
                 f"per-round ratios): {spread(pass_rounds[m])}", abs(statistics.median(pass_rounds[m]) - 1) <= 0.03)
                for m in MASK_MODES),
              ("both mask modes give the same output, finite, not the dense one",
               torch.equal(outputs["copy"].sample, outputs["on-the-fly"].sample)
               and bool(outputs["copy"].sample.isfinite().all())
               and not torch.equal(outputs["copy"].sample, outputs["dense"].sample))]
    print()
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")
    print(f"\ntiming phase: {elapsed:.0f} s")


if __name__ == "__main__":
    main()
