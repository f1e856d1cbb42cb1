"""Baking: export an artifact, validate it against the live dual UNet, and only then let it appear.

Everything is written into a hidden staging folder beside the output (``.<name>.crdiff-tmp-*``; one left by a
killed process is removed by the next run in that folder), verified
there by loading it as a consumer would, and only then renamed into place: the external data file
first, the ``.onnx`` (or ``.safetensors``) last, so a visible artifact is always complete. A failed
verification, an error or Ctrl-C removes the staging folder and leaves no artifact behind.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError
from crdiff_cli.exporters.artifacts import check_outputs, format_of, output_files
from crdiff_cli.exporters.metadata import ArtifactMetadata
from crdiff_cli.exporters.onnx_artifact import DEFAULT_OPSET
from crdiff_cli.exporters.validate import (TOLERANCES, VerificationError, VerificationReport, unet_call,
                                           validate_model_outputs, verification_cases)
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.pruning.targets import require_plain
from crdiff_cli.storage.atomic import share, staging


@dataclass
class BakeResult:
    """What :func:`bake` wrote and how the verification went (``report`` is None without it)."""

    path: Path
    files: list[Path]
    meta: ArtifactMetadata
    report: VerificationReport | None
    export_seconds: float
    verify_seconds: float

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def bake(unet, spec: PruneSpec, *, k: float, resolution: Resolution, family: str, out: Path,
         opset: int = DEFAULT_OPSET, verify: bool = True, overwrite: bool = False, external_data: bool | None = None,
         reference=None, on_stage=None, poa: PoaPolicy | None = None) -> BakeResult:
    """Bake the plain diffusers ``unet`` with ``spec`` and ``k`` into ``out`` (.safetensors or .onnx).

    ``verify`` compares the written artifact with ``reference`` (default: the live
    :class:`~crdiff_cli.dual.unet.DualUNet` of ``unet``, ``spec`` and ``k``) and raises a
    :class:`~crdiff_cli.exporters.validate.VerificationError` on a mismatch, in which case nothing is
    written. A UNet with PEFT adapter layers is refused (fuse and unload the LoRA first).
    ``external_data`` (ONNX) forces or forbids the external weights file; None decides by size.
    ``on_stage(name)`` is called as each stage starts (for progress display). ``poa`` is recorded; an ONNX
    artifact baked with a partial policy gets the one-pass switch (one graph for every kind of step).
    """
    require_plain(unet)
    out = Path(out)
    fmt = format_of(out)
    files = output_files(out)
    check_outputs(out, overwrite)
    if spec.dtype not in TOLERANCES:
        raise CrdiffError(f"artifacts are baked in float32 or float16, not {spec.dtype}; load the model as fp32 or fp16")
    stage = on_stage or (lambda name: None)
    stage("hashing the dense weights")
    poa = poa or PoaPolicy()
    meta = ArtifactMetadata.describe(unet, spec, k, resolution, family, poa,
                                     poa_switch=fmt == "onnx" and not poa.is_full)
    with _staged(out, files) as staging:
        target = staging / out.name
        stage(f"writing {fmt}")
        start = time.perf_counter()
        if fmt == "onnx":
            from crdiff_cli.exporters.onnx_artifact import export_onnx

            export_onnx(unet, meta, target, opset=opset, external_data=external_data, poa_switch=meta.poa_switch)
        else:
            from crdiff_cli.exporters.safetensors_artifact import save_safetensors

            save_safetensors(unet, meta, target)
        exported = time.perf_counter()
        report = None
        if verify:
            stage("verifying against the live dual UNet")
            try:
                report = verify_artifact(target, unet, meta, reference)
            except VerificationError as exc:
                raise type(exc)(f"{exc}; no artifact was written") from None
        verified = time.perf_counter()
    written = [f for f in files if f.exists()]
    return BakeResult(out, written, meta, report, exported - start, verified - exported)


def verify_artifact(path: Path, unet, meta: ArtifactMetadata, reference=None) -> VerificationReport:
    """Load the artifact at ``path`` as a consumer would and validate it against the live dual UNet.

    The metadata must round-trip exactly; for ONNX the file must also pass ``onnx.checker`` and store
    no more weight bytes than the UNet has (no second copy). ONNX runs on ONNX Runtime's CPU provider. A
    graph with the POA switch is also checked pass by pass: its dense pass against the live dual UNet at
    k = 0 (the plain UNet), its pruned pass against it at k = 1.
    """
    from crdiff_cli.dual.unet import DualUNet

    candidate, release = _load_candidate(Path(path), meta, unet)
    live = reference if reference is not None else DualUNet(unet, meta.spec, meta.k)
    k = live.k
    cases = verification_cases(meta.resolution)
    try:
        report = validate_model_outputs(lambda inputs: unet_call(live, inputs), candidate, meta.unet_config, cases,
                                        dtype=meta.dtype)
        if meta.poa_switch:
            from crdiff_cli.exporters.onnx_graph import PASS_DENSE, PASS_PRUNED

            for one_pass, pass_k in ((PASS_DENSE, 0.0), (PASS_PRUNED, 1.0)):
                live.k = pass_k
                validate_model_outputs(lambda inputs: unet_call(live, inputs),
                                       lambda inputs: candidate(inputs, one_pass), meta.unet_config, cases,
                                       dtype=meta.dtype)
        return report
    finally:
        live.k = k
        if reference is None:
            live.release()
        release()


def _load_candidate(path: Path, meta: ArtifactMetadata, unet):
    """``(run, release)`` for the artifact at ``path``, after the structural checks; ``run(inputs, one_pass=None)``
    runs an ONNX policy graph's dense or pruned pass alone when ``one_pass`` is given."""
    if format_of(path) == "safetensors":
        from crdiff_cli.dual.unet import DualUNet
        from crdiff_cli.exporters.safetensors_artifact import load_safetensors_unet

        loaded_unet, loaded_meta = load_safetensors_unet(path)
        _check_round_trip(loaded_meta, meta)
        dual = DualUNet(loaded_unet, loaded_meta.spec, loaded_meta.k)
        return (lambda inputs: unet_call(dual, inputs)), dual.release
    from crdiff_cli.exporters.onnx_artifact import check_onnx, initializer_bytes, read_onnx_metadata
    from crdiff_cli.exporters.onnx_runtime import open_session, run_session

    check_onnx(path)
    _check_round_trip(read_onnx_metadata(path), meta)
    stored, dense = initializer_bytes(path), sum(p.numel() * p.element_size() for p in unet.parameters())
    if stored > dense:
        raise VerificationError(f"verification failed: the graph stores {stored:,} bytes of weights, more than the "
                                f"UNet's {dense:,} (a second copy of weights was exported)")
    session = open_session(path, provider="cpu")
    holder = [session]

    def run(inputs, one_pass=None):
        return run_session(holder[0], inputs) if one_pass is None else run_session(holder[0], inputs, one_pass)[0]

    return run, holder.clear


def _check_round_trip(read: ArtifactMetadata, written: ArtifactMetadata) -> None:
    if read != written:
        raise VerificationError("verification failed: the metadata read back differs from what was written")


@contextmanager
def _staged(out: Path, files: list[Path]):
    """A staging folder beside ``out``; on success its files replace ``files``, sidecars first."""
    with staging(out) as folder:
        yield folder
        for path in reversed(files):  # the main file (first in ``files``) lands last
            staged = folder / path.name
            if staged.exists():
                share(staged)  # writers create some files 0600; artifacts are for sharing
                os.replace(staged, path)
            elif path.exists():  # a previous artifact's sidecar that this one does not use
                path.unlink()
