"""Artifacts by path: their format, their metadata, and putting one into a loaded pipeline.

A ``.safetensors`` artifact runs on the live PyTorch path (its dense UNet rebuilt from the file, the
pruned twin from its thresholds, a :class:`~crdiff_cli.dual.unet.DualUNet` over both), so k and the
ratios can still be changed; a ``.onnx`` artifact runs through ONNX Runtime with k and the thresholds
folded into the graph. Either way the text encoders, tokenizers, VAE and scheduler come from the
base pipeline, whose UNet config must be the artifact's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crdiff_cli import defaults
from crdiff_cli.errors import CrdiffError, ParameterError
from crdiff_cli.exporters.metadata import ArtifactMetadata, comparable_config

FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}


def format_of(path: Path, fmt: str | None = None) -> str:
    """The artifact format named by ``path``'s suffix (checked against ``fmt`` when given)."""
    by_suffix = FORMATS.get(Path(path).suffix.lower())
    if fmt is not None and fmt not in FORMATS.values():
        raise CrdiffError(f"unknown --format {fmt!r}; use safetensors or onnx")
    if by_suffix is None:
        wanted = f".{fmt}" if fmt else ".safetensors or .onnx"
        raise CrdiffError(f"{path}: an artifact's file name must end in {wanted}")
    if fmt is not None and fmt != by_suffix:
        raise CrdiffError(f"{path} ends in {Path(path).suffix} but --format is {fmt}; make them agree")
    return by_suffix


def require_onnx() -> None:
    """Refuse ONNX work in one line when the ``onnx`` extra is not installed."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise CrdiffError(f"{' and '.join(missing)} not installed; ONNX artifacts need pip install 'crdiff[onnx]' "
                          "(or 'crdiff[onnx-gpu]' on a CUDA machine)")


def output_files(path: Path) -> list[Path]:
    """Every file an artifact at ``path`` may consist of, the main file first (for a ``model.onnx`` also the
    ``model.onnx.data`` crdiff named its external data before it followed Optimum's ``model.onnx_data``)."""
    from crdiff_cli.exporters.onnx_artifact import data_path

    if format_of(path) != "onnx":
        return [path]
    legacy = path.with_name(path.name + ".data")
    return [path, data_path(path)] + ([legacy] if legacy != data_path(path) else [])


def check_outputs(path: Path, overwrite: bool) -> None:
    """:func:`~crdiff_cli.storage.atomic.check_output` for every file of an artifact at ``path``.

    ``--overwrite`` replaces only a crdiff artifact (its metadata says so); the ONNX sidecar
    ``NAME.onnx.data`` counts as crdiff's when ``NAME.onnx`` is.
    """
    from crdiff_cli.storage.atomic import OutputKind, check_output

    def is_artifact(_file: Path) -> bool:
        try:
            read_metadata(path)
        except CrdiffError:
            return False
        return True

    main, *sidecars = output_files(path)
    check_output(main, overwrite, OutputKind("crdiff artifact", "crdiff.format in its metadata", is_artifact))
    for sidecar in sidecars:
        check_output(sidecar, overwrite, OutputKind("crdiff artifact's external weights",
                                                    f"crdiff artifact {main.name} beside it", is_artifact))


def read_metadata(path: Path) -> ArtifactMetadata:
    """The metadata of the artifact at ``path`` (headers only; the weights are not loaded)."""
    path = Path(path)
    fmt = format_of(path)
    if not path.is_file():
        raise CrdiffError(f"artifact {path} does not exist; bake one with `crdiff bake`")
    if fmt == "onnx":
        from crdiff_cli.exporters.onnx_artifact import read_onnx_metadata

        require_onnx()

        return read_onnx_metadata(path)
    from crdiff_cli.exporters.safetensors_artifact import read_safetensors_metadata

    return read_safetensors_metadata(path)


def check_base(meta: ArtifactMetadata, unet_config, base: str) -> None:
    """Refuse a base model whose UNet config is not the one the artifact was baked from."""
    ours, theirs = meta.unet_config, comparable_config(unet_config)
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} vs {ours.get(k)!r})" for k in differing[:3])
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        raise ParameterError("model", base, f"has another UNet config than the artifact: {shown}{more}; pass the "
                             "base model the artifact was baked from")


def attach_artifact(loaded, path: Path, meta: ArtifactMetadata, *, k: float | None = None, ratios=None,
                    masks: str = defaults.MASKS, provider: str | None = None, fold_masks: bool = True,
                    warn: Callable[[str], None] | None = None, poa=None):
    """Replace ``loaded.pipe.unet`` by the artifact's; returns ``(dual or None, info)``.

    On the live path (safetensors) ``k`` / ``ratios`` override
    the baked ones; ``dual`` is the DualUNet there and None for ONNX, whose k is fixed. ``poa`` (a
    :class:`~crdiff_cli.dual.poa_policy.PoaPolicy`) overrides the baked policy; an ONNX graph serves a
    partial policy only when it was baked with one (it then has the one-pass switch). Either way the
    weights are checked against the digest recorded at bake; ``warn`` hears that an ONNX artifact baked
    without one is unverified (see :func:`~crdiff_cli.exporters.onnx_runtime.open_session`).
    """
    check_base(meta, loaded.unet.config, loaded.source)
    poa = poa or meta.poa
    info = {"artifact": str(path), "artifact_format": format_of(path), "mode": "crdiff", "poa": poa.to_dict()}
    if format_of(path) == "onnx":
        from crdiff_cli.exporters.onnx_runtime import OnnxUNet, open_session

        if not poa.is_full and not meta.poa_switch:
            raise ParameterError("poa", poa.label(), "needs an ONNX artifact baked with a POA policy (it has the "
                                 "one-pass switch); re-bake it with one, or use the .safetensors artifact")
        session = open_session(path, provider=provider, fold_masks=fold_masks, warn=warn)
        loaded.pipe.unet = OnnxUNet(session, meta, loaded.unet.dtype, poa=poa)
        loaded.pipe.unet.poa.bind(loaded.pipe)
        return None, {**info, "k": meta.k, "ratios": str(meta.spec.ratios), "thresholds": meta.spec.thresholds(),
                      "provider": session.get_providers()[0], "ort_fold_masks": fold_masks}
    from crdiff_cli.dual.apply import apply_crdiff
    from crdiff_cli.exporters.safetensors_artifact import load_safetensors_unet
    from crdiff_cli.pruning.spec import PruneSpec

    unet, meta = load_safetensors_unet(path)
    loaded.pipe.unet = unet.to(loaded.unet.device)
    spec = meta.spec if ratios is None or ratios == meta.spec.ratios else PruneSpec.from_unet(unet, ratios)
    k = meta.k if k is None else k
    dual = apply_crdiff(loaded.pipe, spec, k=k, masks=masks, poa=poa)
    return dual, {**info, "k": k, "ratios": str(spec.ratios), "thresholds": spec.thresholds(), "masks": masks}
