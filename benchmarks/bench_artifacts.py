"""Benchmark: crdiff artifacts on the real SD1.5 UNet architecture (random weights, CPU).

Measures, for a UNet2DConditionModel with SD1.5's config (859.5M parameters, 3.44 GB fp32, seeded
``torch.manual_seed(0)``, no download), the profile sd15@512x512 and k = 1.5, baked at 256x256:

  sizes     safetensors artifact vs the dense UNet's safetensors (target <= 1.01x); ONNX artifact
            (.onnx + .onnx.data) vs a dense-UNet ONNX export of the same model with the same exporter
            (TorchScript, opset 17, default constant folding; target <= 1.05x)
  bake      wall time of `bake` (export + verification, both formats; verification = batch 1 and 2 at
            latent 32x32 and 17x19 against the live dual UNet, fp32 tolerance 1e-4)
  latency   one dual-UNet call, batch 2, latent 32x32 (a 256x256 image), 77 tokens: the live PyTorch
            DualUNet (masks="copy") vs ONNX Runtime's CPU provider on the artifact, masks folded at
            session creation (default) and not folded (--no-ort-fold-masks); goal ONNX <= 1.0x PyTorch.
            Best of --repeats timed calls after one warm-up call.
  memory    VmRSS after loading (PyTorch model built / ORT session created) and VmHWM (peak) at the end,
            each variant in its own fresh process.

Every step runs in its own subprocess (``--child``), so memory numbers do not mix. The dense weights are
built once and handed to the children as a safetensors file in --workdir (deleted at the end unless
--keep). Usage: python benchmarks/bench_artifacts.py [--repeats 2] [--workdir DIR] [--json OUT]
Runtime on 2 CPU cores: about 14 minutes; peak memory about 9 GiB (the ONNX bake with its verification).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD15_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                   block_out_channels=(320, 640, 1280, 1280))
PROFILE = "sd15@512x512"
K = 1.5
RES = "256x256"
LATENT = (2, 32, 32)  # batch, height, width of the latency inputs


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory() -> dict:
    return {"rss_gb": status_kb("VmRSS") / 2**20, "peak_gb": status_kb("VmHWM") / 2**20}


def load_dense(workdir: Path):
    """The benchmark UNet, rebuilt from the dense weights file written by the parent."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_CONFIG)
    unet.load_state_dict(load_file(str(workdir / "dense_unet.safetensors")), assign=True)
    return unet.eval().requires_grad_(False)


def spec_of(unet):
    from crdiff_cli.pruning.profile_table import get_profile
    from crdiff_cli.pruning.spec import PruneSpec

    return PruneSpec.from_unet(unet, get_profile(PROFILE).ratios)


# --- children ----------------------------------------------------------------------------------------

def child_bake(workdir: Path, suffix: str) -> dict:
    from crdiff_cli.exporters.bake import bake
    from crdiff_cli.pruning.resolution import Resolution

    unet = load_dense(workdir)
    start = time.perf_counter()
    result = bake(unet, spec_of(unet), k=K, resolution=Resolution.parse(RES), family="sd15",
                  out=workdir / f"artifact{suffix}", overwrite=True)
    return {"seconds": time.perf_counter() - start, "export_seconds": result.export_seconds,
            "verify_seconds": result.verify_seconds, "bytes": result.size_bytes,
            "files": [f.name for f in result.files], "verification": result.report.summary(),
            "max_relative_error": result.report.max_relative_error, **memory()}


def child_dense_onnx(workdir: Path) -> dict:
    """The reference for the ONNX size target: the plain UNet exported the standard way."""
    import warnings

    import torch

    from crdiff_cli.exporters.onnx_graph import OUTPUT, dynamic_axes, example_inputs, input_names, trace_shape

    unet = load_dense(workdir)
    folder = workdir / "dense-onnx"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    inputs = example_inputs(unet.config, 2, *trace_shape(unet.config))
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Plain().eval(), tuple(inputs.values()), str(folder / "unet.onnx"), dynamo=False,
                          opset_version=17, input_names=input_names(False), output_names=[OUTPUT],
                          dynamic_axes=dynamic_axes(False))
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.iterdir())
    shutil.rmtree(folder)
    return {"seconds": seconds, "bytes": size, **memory()}


def child_latency(workdir: Path, variant: str, repeats: int) -> dict:
    import torch

    from crdiff_cli.exporters.onnx_graph import example_inputs

    start = time.perf_counter()
    if variant == "pytorch":
        from crdiff_cli.dual.unet import DualUNet
        from crdiff_cli.exporters.validate import unet_call

        unet = load_dense(workdir)
        dual = DualUNet(unet, spec_of(unet), K, masks="copy")
        config = unet.config
        call = lambda inputs: unet_call(dual, inputs)  # noqa: E731
    else:
        from crdiff_cli.exporters.artifacts import read_metadata
        from crdiff_cli.exporters.onnx_runtime import open_session, run_session

        path = workdir / "artifact.onnx"
        session = open_session(path, provider="cpu", fold_masks=variant == "onnx-fold")
        config = read_metadata(path).unet_config
        call = lambda inputs: run_session(session, inputs)  # noqa: E731
    loaded = {"load_seconds": time.perf_counter() - start, "rss_after_load_gb": memory()["rss_gb"]}
    inputs = example_inputs(config, *LATENT)
    outputs, times = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        outputs.append(call(inputs))
        if i:
            times.append(time.perf_counter() - start)
    torch.save(outputs[-1], workdir / f"out-{variant}.pt")
    return {**loaded, "seconds": min(times), "all_seconds": times, "threads": torch.get_num_threads(), **memory()}


# --- parent ------------------------------------------------------------------------------------------

def run_child(args, *extra) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra, "--workdir", str(args.workdir), "--repeats", str(args.repeats)]
    print("  $", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_dense(workdir: Path) -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_CONFIG).eval()
    path = workdir / "dense_unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the workdir (dense weights, artifacts)")
    parser.add_argument("--child", nargs="+", default=None)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        func = {"bake": lambda: child_bake(args.workdir, rest[0]), "dense-onnx": lambda: child_dense_onnx(args.workdir),
                "latency": lambda: child_latency(args.workdir, rest[0], args.repeats)}[kind]
        print(json.dumps(func()))
        return

    own = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-artifacts-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average_start": os.getloadavg()}}
    started = time.perf_counter()
    try:
        print("building the SD1.5-architecture UNet (seed 0)", flush=True)
        results["dense_safetensors_bytes"] = build_dense(args.workdir)
        print("baking", flush=True)
        results["bake_safetensors"] = run_child(args, "bake", ".safetensors")
        results["bake_onnx"] = run_child(args, "bake", ".onnx")
        results["dense_onnx"] = run_child(args, "dense-onnx")
        print("latency", flush=True)
        for variant in ("pytorch", "onnx-fold", "onnx-nofold"):
            results[f"latency_{variant}"] = run_child(args, "latency", variant)
        import torch

        ref = torch.load(args.workdir / "out-pytorch.pt")
        for variant in ("onnx-fold", "onnx-nofold"):
            got = torch.load(args.workdir / f"out-{variant}.pt")
            results[f"latency_{variant}"]["relative_error_vs_pytorch"] = float((got - ref).abs().max() / ref.abs().max())
    finally:
        if own and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict) -> None:
    gb = 1e9
    st, ox, dense_ox = r["bake_safetensors"], r["bake_onnx"], r["dense_onnx"]
    torch_s = r["latency_pytorch"]["seconds"]
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| safetensors artifact / dense UNet safetensors | {st['bytes'] / gb:.3f} GB / "
          f"{r['dense_safetensors_bytes'] / gb:.3f} GB = {st['bytes'] / r['dense_safetensors_bytes']:.4f}x | <= 1.01x |")
    print(f"| ONNX artifact / dense-UNet ONNX export | {ox['bytes'] / gb:.3f} GB / {dense_ox['bytes'] / gb:.3f} GB = "
          f"{ox['bytes'] / dense_ox['bytes']:.4f}x | <= 1.05x |")
    for name, b in (("safetensors", st), ("ONNX", ox)):
        print(f"| bake {name}: total (export + verify) | {b['seconds']:.0f} s ({b['export_seconds']:.0f} + "
              f"{b['verify_seconds']:.0f}), peak RSS {b['peak_gb']:.1f} GiB, {b['verification']} | |")
    print(f"| dense-UNet ONNX export (reference) | {dense_ox['seconds']:.0f} s | |")
    print("\n| dual UNet call, batch 2, latent 32x32 | best s | vs PyTorch | RSS after load | peak RSS | rel. error |")
    print("|---|---|---|---|---|---|")
    for variant, label in (("pytorch", "PyTorch DualUNet (masks=copy)"), ("onnx-fold", "ONNX Runtime CPU, masks folded"),
                           ("onnx-nofold", "ONNX Runtime CPU, masks not folded")):
        v = r[f"latency_{variant}"]
        print(f"| {label} | {v['seconds']:.2f} | {v['seconds'] / torch_s:.2f}x | {v['rss_after_load_gb']:.2f} GiB | "
              f"{v['peak_gb']:.2f} GiB | {v.get('relative_error_vs_pytorch', 0):.1e} |")
    m = r["machine"]
    print(f"\n{m['cpus']} CPUs, load average {m['load_average_start'][0]:.1f} at start, "
          f"{m['load_average_end'][0]:.1f} at end; total {r['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
