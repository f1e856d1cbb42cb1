"""Benchmark: exact group thresholds on the real SD1.5 UNet architecture (random weights).

Compares, for CR-Diff's three pruning groups (down/mid/up):

  (a) baseline  per group ``torch.cat([w.abs().flatten() ...]).kthvalue(m)`` (concatenate + clone + kthvalue)
  (b) ours      ``PruneStats(unet).spec(ratios)`` (streaming radix select, crdiff_cli.pruning.selection)
  (c) cached    ``stats.spec(other_ratios)`` on an existing PruneStats: the case a ratio search hits
                once per candidate (each new ratio set needs only the second radix pass)

Targets: (b) >= 5x faster than (a), extra peak memory <= 10% of the UNet's parameter bytes,
thresholds (and pruned counts) identical to (a).

How memory is measured: every method runs in its own fresh subprocess, which builds the UNet (seeded
``torch.manual_seed``, SD1.5 config, no download), runs ``gc.collect()`` and glibc ``malloc_trim(0)``,
then resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM`` to the
current RSS) and reads ``VmRSS``. After the method's first run, ``VmHWM - VmRSS_before`` is its extra
peak resident memory. (tracemalloc cannot see torch's allocations.) If clear_refs is not writable, a
1 ms polling thread on ``VmRSS`` is used instead and the report says so.

Usage: python benchmarks/bench_thresholds.py [--repeats 3] [--profile sd15@512x512] [--threads N]
Runtime on 2 CPU cores: about 1.5 minutes (three UNet builds of ~9 s, baseline ~8 s per repeat).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time

SD15_CONFIG = dict(  # diffusers' UNet2DConditionModel defaults are SD1.5's, except these
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
)
CACHED_PROFILES = ("sd15@400x560", "sd15@480x360", "sd15@768x768")  # the "new ratio set" of case (c)


# --- memory probes -----------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Extra peak resident memory (bytes) of the code run inside the ``with`` block."""

    def __init__(self):
        self.how = "VmHWM after /proc/self/clear_refs reset"
        self.extra = 0

    def __enter__(self):
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._poll = None
        except OSError:
            self.how = "1 ms polling of VmRSS (clear_refs not writable)"
            self._peak, self._stop = 0, threading.Event()
            self._poll = threading.Thread(target=self._sample, daemon=True)
        self.before = _status_kb("VmRSS")
        if self._poll:
            self._peak = self.before
            self._poll.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kb("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self._poll:
            self._stop.set()
            self._poll.join()
            peak = self._peak
        else:
            peak = _status_kb("VmHWM")
        self.extra = max(0, peak - self.before) * 1024


# --- the methods -------------------------------------------------------------------------------------

def build_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_CONFIG).eval().requires_grad_(False)


def baseline_thresholds(weights, ratios) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        for group, ws in weights.items():
            n = sum(p.numel() for _, p in ws)
            m = math.floor(n * ratios[group])
            out[group] = None if m == 0 else torch.cat([p.abs().flatten() for _, p in ws]).kthvalue(m).values.item()
    return out


def worker(method: str, args) -> dict:
    import torch

    from crdiff_cli.pruning.profile_table import get_profile
    from crdiff_cli.pruning.spec import PruneStats
    from crdiff_cli.pruning.targets import target_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = get_profile(args.profile).ratios
    others = [get_profile(name).ratios for name in CACHED_PROFILES]
    t0 = time.perf_counter()
    unet = build_unet(args.seed)
    build_s = time.perf_counter() - t0
    weights = target_weights(unet)
    result = {"method": method, "build_s": build_s, "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in unet.parameters()),
              "param_bytes": sum(p.numel() * p.element_size() for p in unet.parameters()),
              "targets": {g: [len(ws), sum(p.numel() for _, p in ws)] for g, ws in weights.items()}}

    times, cpu = [], []

    def timed(fn, *a):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*a)
        times.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        return out

    if method == "baseline":
        with PeakRSS() as mem:
            timed(baseline_thresholds, weights, ratios)
        for _ in range(args.repeats - 1):
            timed(baseline_thresholds, weights, ratios)
        # reference values for every ratio set, and brute-force pruned counts (not timed)
        result["thresholds"] = {str(r): baseline_thresholds(weights, r) for r in [ratios, *others]}
        result["counts"] = {str(r): {g: None if t is None else int(sum(int((p.abs() <= t).sum()) for _, p in weights[g]))
                                     for g, t in ths.items()}
                            for r, ths in zip([ratios, *others], result["thresholds"].values())}
    elif method == "ours":
        with PeakRSS() as mem:
            spec = timed(lambda: PruneStats(unet).spec(ratios))
        for _ in range(args.repeats - 1):
            timed(lambda: PruneStats(unet).spec(ratios))
        result["thresholds"] = {str(ratios): spec.thresholds()}
        result["counts"] = {str(ratios): {g: s.pruned if s.threshold is not None else None for g, s in spec.groups.items()}}
    elif method == "cached":
        stats = PruneStats(unet)
        stats.spec(ratios)  # the search has already evaluated some ratio set
        with PeakRSS() as mem:
            # each a new ratio set: a fresh m in every group, so no memoised answer
            specs = [timed(stats.spec, r) for r in others]
        result["thresholds"] = {str(s.ratios): s.thresholds() for s in specs}
        result["counts"] = {str(s.ratios): {g: x.pruned if x.threshold is not None else None for g, x in s.groups.items()}
                            for s in specs}
    else:
        raise SystemExit(f"unknown method {method}")
    result.update(times=times, best_s=min(times), cpu=cpu, best_cpu_s=min(cpu), extra_peak_bytes=mem.extra,
                  memory_probe=mem.how)
    return result


# --- driver ------------------------------------------------------------------------------------------

def run_worker(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--repeats", str(args.repeats),
           "--profile", args.profile, "--seed", str(args.seed), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {method} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is reported)")
    parser.add_argument("--profile", default="sd15@512x512", help="built-in profile whose ratios are timed")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the random UNet")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every method (0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    command = "python benchmarks/bench_thresholds.py" + "".join(
        f" --{k} {v}" for k, v in (("repeats", args.repeats), ("profile", args.profile), ("seed", args.seed),
                                   ("threads", args.threads))
        if v != parser.get_default(k))
    print(f"$ {command}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; python {platform.python_version()}; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {m: run_worker(m, args) for m in ("baseline", "ours", "cached")}
    base, ours, cached = results["baseline"], results["ours"], results["cached"]
    import torch

    print(f"torch {torch.__version__} ({base['threads']} threads); UNet: SD1.5 architecture, random weights, "
          f"{base['params'] / 1e6:.1f}M params, fp32, {base['param_bytes'] / 2**30:.2f} GiB")
    print("targets: " + ", ".join(f"{g} {n / 1e6:.1f}M weights in {k} layers" for g, (k, n) in base["targets"].items()))
    print(f"ratios: profile {args.profile}; cached case: each of {', '.join(CACHED_PROFILES)} on one PruneStats")
    print(f"memory probe: {ours['memory_probe']}, each method in a fresh subprocess\n")

    def same(res):
        return all(base["thresholds"][k] == v and base["counts"][k] == res["counts"][k] for k, v in res["thresholds"].items())

    pb = base["param_bytes"]
    print("| method | wall time, best | speedup vs (a) | CPU time, best | CPU speedup | extra peak RSS | of UNet size "
          "| thresholds + counts = (a) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    rows = [("(a) baseline: cat + abs + kthvalue, per group", base, f"{len(base['times'])} runs"),
            ("(b) ours: `PruneStats(unet).spec(ratios)`", ours, f"{len(ours['times'])} runs"),
            ("(c) ours, new ratio set on cached `PruneStats`", cached, f"{len(cached['times'])} ratio sets")]
    for name, res, runs in rows:
        print(f"| {name} | {res['best_s']:.3f} s ({runs}) | {base['best_s'] / res['best_s']:.1f}x | "
              f"{res['best_cpu_s']:.3f} s | {base['best_cpu_s'] / res['best_cpu_s']:.1f}x | "
              f"{res['extra_peak_bytes'] / 2**20:.0f} MiB | {res['extra_peak_bytes'] / pb:.1%} | "
              f"{'yes' if res is base else ('yes' if same(res) else 'NO')} |")
    print()
    speedup = base["best_s"] / ours["best_s"]
    checks = [(f"speedup (b) vs (a) >= 5x: {speedup:.1f}x", speedup >= 5),
              (f"extra peak memory (b) <= 10% of UNet: {ours['extra_peak_bytes'] / pb:.2%}", ours["extra_peak_bytes"] <= 0.10 * pb),
              (f"extra peak memory (c) <= 10% of UNet: {cached['extra_peak_bytes'] / pb:.2%}", cached["extra_peak_bytes"] <= 0.10 * pb),
              ("thresholds and pruned counts identical, (b) and (c) vs (a)", same(ours) and same(cached))]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    print("\nthresholds (a):")
    for key, ths in base["thresholds"].items():
        print(f"  {key}: " + ", ".join(f"{g} {t!r} ({base['counts'][key][g] or 0:,} pruned)" for g, t in ths.items()))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("raw wall times (s): " + "; ".join(f"{m} {[round(t, 3) for t in r['times']]}" for m, r in results.items()))
    print("raw CPU times (s): " + "; ".join(f"{m} {[round(t, 3) for t in r['cpu']]}" for m, r in results.items())
          + f"; UNet build {base['build_s']:.1f} s per subprocess")


if __name__ == "__main__":
    main()
