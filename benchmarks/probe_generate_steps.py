"""Probe: per-step times inside one real ``crdiff generate`` process, and its UNet passes timed apart.

Why: ``bench_generate_process.py`` takes a step's cost as the difference of two whole processes, so a
second or two of noise in loading lands on the per-step figure. This probe runs the command itself
(``crdiff_cli.cli.main``, the same start-up, malloc set-up and pipeline as the console script) in this
process, with two timers added from outside: a timestamp at every denoising step (wrapping the
``on_step`` callback of ``generate_images``) and, for CR-Diff, the time of the pruned pass inside each
dual-UNet call (``DualUNet._pruned``), the rest of that call being the dense pass and the POA
combination. Nothing in the command's work changes.

Usage: python benchmarks/probe_generate_steps.py [crdiff generate arguments...]
Prints the steps' times, their median (steps 3 on, past the warm-up) and, with a dual UNet, the medians
of its dense and pruned passes. Threads: set ``OMP_NUM_THREADS`` as a user would.
"""

from __future__ import annotations

import statistics
import sys
import time


def main() -> None:
    from crdiff_cli.runtime.malloc_tuning import reuse_large_blocks

    reuse_large_blocks()  # before the timers' imports load torch, as the console script does (main repeats it)
    import crdiff_cli.dual.unet as dual_unet
    import crdiff_cli.pipelines.generation as generate

    stamps: list[float] = []
    pruned_passes: list[float] = []
    dual_calls: list[float] = []
    generate_images, dual_forward, dual_pruned = (generate.generate_images, dual_unet.DualUNet.forward,
                                                  dual_unet.DualUNet._pruned)

    def timed_generate_images(pipe, prompts, seeds, settings, on_step=None):
        def step():
            stamps.append(time.perf_counter())
            if on_step:
                on_step()
        stamps.append(time.perf_counter())
        return generate_images(pipe, prompts, seeds, settings, step)

    def timed_forward(self, *args, **kwargs):
        started = time.perf_counter()
        result = dual_forward(self, *args, **kwargs)
        dual_calls.append(time.perf_counter() - started)
        return result

    def timed_pruned(self, *args, **kwargs):
        started = time.perf_counter()
        result = dual_pruned(self, *args, **kwargs)
        pruned_passes.append(time.perf_counter() - started)
        return result

    generate.generate_images = timed_generate_images
    dual_unet.DualUNet.forward = timed_forward
    dual_unet.DualUNet._pruned = timed_pruned
    from crdiff_cli.cli import main as crdiff_main

    sys.argv = ["crdiff", "generate", *sys.argv[1:]]
    try:
        crdiff_main()
    except SystemExit as exc:
        if exc.code:
            raise
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print("steps (s): " + " ".join(f"{s:.3f}" for s in steps), file=sys.stderr)
    if len(steps) > 2:
        print(f"median step from step 3: {statistics.median(steps[2:]):.3f} s", file=sys.stderr)
    if len(pruned_passes) > 2 and len(pruned_passes) == len(dual_calls):
        dense = [call - pruned for call, pruned in zip(dual_calls, pruned_passes)]
        print(f"median from call 3: dense pass + POA {statistics.median(dense[2:]):.3f} s, "
              f"pruned pass {statistics.median(pruned_passes[2:]):.3f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
