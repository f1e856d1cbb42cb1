"""`crdiff bake`: a dual UNet (dense weights, thresholds, k) as one safetensors or ONNX artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crdiff_cli import defaults
from crdiff_cli.cli.shared import (LORA_HELP, MODEL_HELP, POA_INTERVAL_OPTION, POA_OUTSIDE_OPTION, POA_REFRESH_OPTION,
                                   PROFILE_HELP, RATIOS_HELP, RES_HELP, command, err, out, poa_policy, warn)
from crdiff_cli.errors import CrdiffError

PIPELINE_FORMAT = "onnx-pipeline"


@command
def bake(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    res: str = typer.Option(..., "--res", help=RES_HELP + " Recorded in the artifact (the default for generate) "
                            "and used for --verify; without --ratios/--profile it picks the paper's profile."),
    out_path: Path = typer.Option(..., "--out", "-o", help="The artifact: NAME.safetensors or NAME.onnx (large ONNX "
                                  "models also write NAME.onnx.data, or model.onnx_data, beside it); with "
                                  "--format onnx-pipeline, a new folder."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help=RATIOS_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    k: float = typer.Option(defaults.K, "--k", help="POA coefficient folded into the artifact: e = e_dense + k "
                            "(e_pruned - e_dense)."),
    poa_interval: Optional[str] = POA_INTERVAL_OPTION,
    poa_outside: Optional[str] = POA_OUTSIDE_OPTION,
    poa_refresh: Optional[int] = POA_REFRESH_OPTION,
    fmt: Optional[str] = typer.Option(None, "--format", help="safetensors or onnx (default: from the --out suffix), "
                                      "or onnx-pipeline: a whole ONNX Runtime / Optimum pipeline folder that runs "
                                      "without torch (crdiff generate --pipeline; docs/deployment.md)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights dtype: fp32, or fp16 (for GPU deployment)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (14-20; 17 is what TensorRT and ONNX Runtime are "
                              "known to handle)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the written artifact and compare it with the "
                                "live dual UNet at two resolutions and batch sizes 1 and 2 (fails above relative "
                                "error 1e-4 in fp32, 1e-2 in fp16; nothing is written then)."),
    triton: Optional[Path] = typer.Option(None, "--triton", help="With --format onnx-pipeline: also write a Triton "
                                          "Inference Server model repository here (the ONNX models plus a Python "
                                          "model running the torch-free runner)."),
    tensorrt_conventions: bool = typer.Option(False, "--tensorrt-conventions", help="With --format onnx-pipeline: "
                                              "the UNet as NVIDIA's TensorRT demo feeds it (output latent, scalar "
                                              "timestep); diffusers' ONNX pipeline then cannot run the folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", metavar="PATH[:SCALE]", help=LORA_HELP + " The artifact holds the fused UNet."),
):
    """Bake CR-Diff into one deployable artifact: the dense UNet weights once, plus what makes the pruned twin.

    .safetensors: dense weights + thresholds, k, ratios, resolution and UNet config in the header; runs
    on the live PyTorch path. .onnx: one graph computing e_dense + k (e_pruned - e_dense), the pruned
    weights masked in-graph from the shared ones. The --poa-* policy is recorded (generate follows it); an
    .onnx baked with one also serves one-pass steps from the same weights (input poa_pass). Exit code 1 if
    verification fails, 2 for bad input.
    """
    from crdiff_cli.dual.options import check_k
    from crdiff_cli.exporters.artifacts import check_outputs, format_of, require_onnx
    from crdiff_cli.exporters.onnx_artifact import check_opset
    from crdiff_cli.pipelines.lora import prepare_loras
    from crdiff_cli.pruning.profile_table import check_ratio_source
    from crdiff_cli.pruning.resolution import Resolution

    resolution = Resolution.parse(res)
    kind = PIPELINE_FORMAT if fmt == PIPELINE_FORMAT else format_of(out_path, fmt)
    if dtype not in ("fp32", "fp16"):
        raise CrdiffError(f"--dtype {dtype!r}: artifacts are baked as fp32 or fp16")
    if kind != "safetensors":
        require_onnx()
        check_opset(opset)
    check_ratio_source(ratios=ratios, profile=profile, resolution=resolution)
    warning = check_k(k)
    policy = poa_policy(poa_interval, poa_outside, poa_refresh)
    if kind == PIPELINE_FORMAT:
        _check_pipeline_outputs(out_path, triton, tensorrt_conventions, policy, overwrite)
    elif triton is not None or tensorrt_conventions:
        flag = "--triton" if triton is not None else "--tensorrt-conventions"
        raise CrdiffError(f"{flag} applies to pipeline folders; add --format onnx-pipeline")
    else:
        check_outputs(out_path, overwrite)
    loras = prepare_loras(lora, model)
    if warning:
        warn(warning)

    from crdiff_cli.cli.render import spec_table
    from crdiff_cli.exporters.bake import bake as bake_artifact
    from crdiff_cli.exporters.onnx_pipeline import bake_pipeline
    from crdiff_cli.pipelines.prepare import choose_spec, load_prepared

    with err.status(f"loading {model}"):
        loaded = load_prepared(model, dtype=dtype, loras=loras)
    with err.status("computing thresholds") as status:
        choice, spec = choose_spec(loaded, ratios=ratios, profile=profile, resolution=resolution, warn=warn)
        if kind == PIPELINE_FORMAT:
            result = bake_pipeline(loaded, spec, k=k, resolution=resolution, out=out_path, opset=opset, verify=verify,
                                   overwrite=overwrite, on_stage=status.update,
                                   tensorrt_conventions=tensorrt_conventions, poa=policy)
        else:
            result = bake_artifact(loaded.unet, spec, k=k, resolution=resolution, family=loaded.family, out=out_path,
                                   opset=opset, verify=verify, overwrite=overwrite, on_stage=status.update, poa=policy)
    policy_text = "" if policy.is_full else f", POA {policy.describe()}"
    out.print(spec_table(spec, title=f"{model} ({loaded.family}) baked with {choice.origin}, k={k:g}{policy_text}, "
                                     f"{resolution} HxW"))
    if kind == PIPELINE_FORMAT:
        _report_pipeline(result)
        if triton is not None:
            from crdiff_cli.deploy.triton import write_repository

            models = write_repository(out_path, triton, overwrite=overwrite)
            out.print(f"wrote the Triton model repository {triton} ({', '.join(models)})")
        return
    if result.report is not None:
        out.print(f"verified: {result.report.summary()}")
    else:
        warn("not verified (--no-verify)")
    files = ", ".join(f"{f} ({f.stat().st_size / 2**20:,.1f} MiB)" for f in result.files)
    out.print(f"wrote {files} in {result.export_seconds + result.verify_seconds:.1f} s")


def _check_pipeline_outputs(out_path: Path, triton: Optional[Path], tensorrt_conventions: bool, policy,
                            overwrite: bool) -> None:
    """Refuse, before the model loads, what a pipeline folder (and its Triton repository) cannot be."""
    from crdiff_cli.exporters.onnx_pipeline import check_pipeline_output

    if tensorrt_conventions and not policy.is_full:
        raise CrdiffError("--tensorrt-conventions makes the UNet the TensorRT demo feeds, which has no poa_pass input "
                          "for a POA policy; drop one of them")
    if triton is not None:
        from crdiff_cli.deploy.triton import REPOSITORY
        from crdiff_cli.storage.atomic import check_output

        if tensorrt_conventions:
            raise CrdiffError("--triton cannot serve the TensorRT demo's scalar timestep (Triton declares no scalar "
                              "input with max_batch_size 0); drop --tensorrt-conventions or --triton")
        ours, theirs = out_path.resolve(), triton.resolve()
        if ours == theirs or ours in theirs.parents or theirs in ours.parents:
            raise CrdiffError(f"--out {out_path} and --triton {triton} overlap; write them to separate folders")
        check_output(triton, overwrite, REPOSITORY)
    check_pipeline_output(out_path, overwrite)


def _report_pipeline(result) -> None:
    """What a pipeline bake verified and wrote."""
    if result.unet_report is not None:
        out.print(f"verified: UNet {result.unet_report.summary()}; whole folder within "
                  f"{result.max_pixel_difference}/255 of the live pipeline")
    else:
        warn("not verified (--no-verify)")
    dtypes = ", ".join(f"{name} {c['dtype']}" for name, c in result.record["components"].items())
    out.print(f"wrote {result.path} ({result.size_bytes / 2**20:,.1f} MiB: {dtypes}) in {result.seconds:.1f} s")
