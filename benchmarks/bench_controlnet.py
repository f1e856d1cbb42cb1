"""Benchmark: a ControlNet denoising step with the dual UNet vs the dense UNet (SD1.5 architecture, CPU).

The ControlNet target: dual step with ControlNet <= 1.9x the dense step with ControlNet, because the
ControlNet pass is shared by both branches (the pipeline runs it once per step; the DualUNet passes its
residuals to the dense and to the pruned pass). A step here is what diffusers' ControlNet pipeline does
per step under classifier-free guidance: one ControlNet call on the batch of 2, then one UNet call with
its residuals. Variants, timed back to back in rounds so that load from other processes hits them alike:

  dense      ControlNet + dense UNet                     (the baseline)
  dual       ControlNet + DualUNet(k = 1.5, masks=copy)  (what crdiff runs: ControlNet once)
  unshared   2 x (ControlNet + UNet)                     (for reference: a ControlNet pass per branch)

Weights are random (seeded) in the real SD1.5 UNet architecture; the ControlNet is
``ControlNetModel.from_unet`` of it (the SD1.5 ControlNet architecture), with seeded output convolutions.
glibc malloc is set up as the ``crdiff`` CLI sets it at start-up (``crdiff_cli.runtime.malloc_tuning``), and no
other allocator or thread setting is changed. Per variant the median wall time and the median process
CPU time (``time.process_time``, all threads) are reported; the ratio is the median over rounds of the
per-round ``dual / dense`` wall times.

``--whole-process`` (instead of the in-process measurement) backs it with runs of the command itself: a pipeline folder with this UNet and
ControlNet (and a small text encoder and VAE, which cost little next to them) is written to a temporary
folder, and ``crdiff generate --controlnet ...`` is timed as a subprocess, dense and CR-Diff, at two step
counts: the difference over the difference in steps is the cost of one step (loading and the VAE cancel).

Usage: python benchmarks/bench_controlnet.py [--latent 32] [--rounds 3]
       python benchmarks/bench_controlnet.py --whole-process [--latent 32] [--steps 2 6]
Runtime on 2 otherwise idle CPU cores: about 1.5 minutes at --latent 16 --rounds 5, 3 minutes for
--whole-process --latent 16 --steps 2 10 (many times longer when other processes share the cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from crdiff_cli.dual.unet import DualUNet
from crdiff_cli.pruning.profile_table import get_profile
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.runtime.malloc_tuning import reuse_large_blocks

SD15_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                   block_out_channels=(320, 640, 1280, 1280))  # the rest are diffusers' defaults (SD1.5's)
K = 1.5
TARGET = 1.9


def build(seed: int = 0):
    """The SD1.5 UNet and its ControlNet, seeded; the ControlNet's zero convolutions get seeded noise."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_CONFIG).eval().requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    return unet, controlnet


def step(controlnet, unet, inputs):
    """One ControlNet-pipeline step under CFG: a ControlNet call, then the UNet with its residuals."""
    sample, t, text, cond = inputs
    down, mid = controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    return unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def in_process(latent: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    unet, controlnet = build()
    spec = PruneSpec.from_unet(unet, get_profile("sd15@512x512").ratios)
    gen = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, 4, latent, latent, generator=gen), torch.tensor(500),
              torch.randn(2, 77, 768, generator=gen), torch.rand(2, 3, 8 * latent, 8 * latent, generator=gen))
    dual = DualUNet(unet, spec, k=K, masks="copy")
    variants = {"dense": lambda: step(controlnet, unet, inputs),
                "dual": lambda: step(controlnet, dual, inputs),
                "unshared": lambda: (step(controlnet, unet, inputs), step(controlnet, unet, inputs))}
    for fn in variants.values():  # warm-up
        timed(fn)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    dual.release()
    return times


def whole_process(latent: int, steps: list[int]) -> dict[str, dict[int, float]]:
    """Wall seconds of ``crdiff generate --controlnet`` as a subprocess, dense and CR-Diff (k = 1.5), per step count."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from crdiff_cli.pipelines.tiny import clip_tokenizer

    unet, controlnet = build()
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=768,
                                                num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-controlnet-") as tmp:
        root = Path(tmp)
        pipe.save_pretrained(root / "sd15-random", safe_serialization=True)
        controlnet.save_pretrained(root / "controlnet", safe_serialization=True)
        Image.new("RGB", (8 * latent, 8 * latent), "white").save(root / "control.png")
        crdiff = Path(sys.executable).parent / "crdiff"
        common = [str(crdiff), "generate", "--model", str(root / "sd15-random"), "--res", f"{8 * latent}x{8 * latent}",
                  "--prompt", "a house", "--controlnet", str(root / "controlnet"),
                  "--control-image", str(root / "control.png"), "--ratios", "0.3/0.3/0.3"]
        for n in steps:
            for name, extra in (("dense", ["--dense"]), ("dual", ["--k", str(K)])):
                start = time.perf_counter()
                subprocess.run([*common, "--steps", str(n), *extra, "--out", str(root / f"{name}-{n}")], check=True,
                               capture_output=True)
                results.setdefault(name, {})[n] = time.perf_counter() - start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256x256 images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--whole-process", action="store_true", help="time `crdiff generate` subprocesses instead")
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 6], help="the whole-process runs' two step counts")
    args = parser.parse_args()
    reuse_large_blocks()  # as the crdiff process does (its subprocesses do it themselves)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; load: {os.getloadavg()}")
    if args.whole_process:
        results = whole_process(args.latent, args.steps)
        short, long = args.steps
        per_step = {name: (runs[long] - runs[short]) / (long - short) for name, runs in results.items()}
        ratio = per_step["dual"] / per_step["dense"]
        print(f"crdiff generate --controlnet, {8 * args.latent}x{8 * args.latent}, whole process at {short} and {long} "
              f"steps: dense {results['dense'][short]:.1f} / {results['dense'][long]:.1f} s, CR-Diff k={K} "
              f"{results['dual'][short]:.1f} / {results['dual'][long]:.1f} s; per step dense {per_step['dense']:.2f} s, "
              f"CR-Diff {per_step['dual']:.2f} s = {ratio:.2f}x (target <= {TARGET}x): "
              f"{'PASS' if ratio <= TARGET else 'FAIL'}; load: {os.getloadavg()}")
        return
    times = in_process(args.latent, args.rounds)
    base = statistics.median(w for w, _ in times["dense"])
    print(f"step at latent {args.latent}x{args.latent}, CFG batch 2, {args.rounds} rounds (median wall / CPU s):")
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"  {name:9s} {wall:7.2f} s  {cpu:7.2f} s CPU  {wall / base:5.2f}x   runs: "
              + ", ".join(f"{w:.2f}" for w, _ in runs))
    ratio = statistics.median(d / b for (d, _), (b, _) in zip(times["dual"], times["dense"]))
    print(f"dual vs dense with ControlNet: {ratio:.2f}x (target <= {TARGET}x): {'PASS' if ratio <= TARGET else 'FAIL'}"
          f"; load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
