"""The ONNX artifact: one graph for ``e_d + k (e_p - e_d)``, every weight stored once.

Export traces :class:`~crdiff_cli.exporters.onnx_graph.DualGraph` with PyTorch's TorchScript exporter
(``dynamo=False``: fast, deduplicates the parameters the two passes share, opsets up to 20)
without constant folding, which would otherwise precompute the pruned pass's masked weights into a
second copy. The :mod:`.metadata` table goes into ``metadata_props``.

Weights live inside the ``.onnx`` file when they fit in protobuf's 2 GiB, else in ONE external data
file ``<name>.onnx.data`` beside it (the TorchScript exporter writes one file per tensor for large
models; they are streamed into that single file, 4 KiB-aligned, without loading the model).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from crdiff_cli.errors import CrdiffError
from crdiff_cli.exporters.metadata import ArtifactError, ArtifactMetadata
from crdiff_cli.errors import first_line

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
MAX_OPSET = 20  # the TorchScript exporter's limit; NVIDIA saw GroupNorm at opset 21 fail on TensorRT 10.7
INLINE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, less headroom for the graph itself
ALIGNMENT = 4096  # external tensors start on page boundaries, so runtimes may memory-map them
DATA_SHA256, DATA_BYTES = "crdiff.external_data_sha256", "crdiff.external_data_bytes"  # integrity of NAME.onnx.data


def data_path(path: Path) -> Path:
    """Where the external weights of ``path`` go: ``<name>.onnx.data`` beside it."""
    return path.with_name(path.name + ".data")


def export_onnx(unet, meta: ArtifactMetadata, path: Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None) -> None:
    """Trace the dual graph of ``unet`` (with ``meta``'s spec and k) into ``path`` (+ ``path.data``).

    ``external_data``: None decides by size (external above 2 GiB), True/False forces it. Writes
    scratch files into a folder beside ``path``; the caller makes the whole write atomic.
    """
    import shutil
    import tempfile

    import onnx
    import torch

    from crdiff_cli.exporters.onnx_graph import (OUTPUT, dual_graph, dynamic_axes, example_inputs, input_names,
                                                 is_sdxl, trace_shape)

    check_opset(opset)
    sdxl = is_sdxl(unet.config)
    dtype = getattr(torch, meta.dtype)
    scratch = Path(tempfile.mkdtemp(prefix=".trace-", dir=path.parent))
    try:
        raw = scratch / "graph.onnx"
        inputs = example_inputs(unet.config, 2, *trace_shape(unet.config), dtype=dtype)
        with dual_graph(unet, meta.spec, meta.k) as graph, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
            torch.onnx.export(graph, tuple(inputs.values()), str(raw), dynamo=False, opset_version=opset,
                              input_names=input_names(sdxl), output_names=[OUTPUT], dynamic_axes=dynamic_axes(sdxl),
                              do_constant_folding=False)
        model = onnx.load(str(raw), load_external_data=False)
        model.producer_name, model.producer_version = "crdiff", meta.crdiff_version
        for key, value in meta.to_strings().items():
            model.metadata_props.add(key=key, value=value)
        exported_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if exported_external and external_data is False:
            raise CrdiffError("this UNet's weights exceed protobuf's 2 GiB: they must go to an external data file")
        if exported_external or external_data or (external_data is None and model.ByteSize() > INLINE_LIMIT):
            digest, size = _write_external(model.graph.initializer, scratch, data_path(path))
            model.metadata_props.add(key=DATA_SHA256, value=digest)
            model.metadata_props.add(key=DATA_BYTES, value=str(size))
        onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_external(tensors, scratch: Path, target: Path) -> tuple[str, int]:
    """Move every initializer's bytes into ``target`` (aligned) and point the tensors at it.

    Bytes come from the exporter's one-file-per-tensor external data (large models) or from the
    tensor itself (``raw_data``); tensors in neither (none from the TorchScript exporter) stay inline.
    Returns the file's SHA-256 and size, recorded in the graph's metadata for :func:`check_external_data`.
    """
    import onnx

    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = {e.key: e.value for e in tensor.external_data}
                with open(scratch / entries["location"], "rb") as src:
                    src.seek(int(entries.get("offset", 0)))
                    data = src.read(int(entries["length"])) if "length" in entries else src.read()
            elif tensor.HasField("raw_data"):
                data = tensor.raw_data
            else:
                continue
            offset = out.tell() + (-out.tell() % ALIGNMENT)
            for chunk in (b"\0" * (offset - out.tell()), data):
                out.write(chunk)
                digest.update(chunk)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", target.name), ("offset", str(offset)), ("length", str(len(data)))):
                tensor.external_data.add(key=key, value=value)
        size = out.tell()
    return digest.hexdigest(), size


def check_external_data(path: Path) -> None:
    """Refuse an artifact whose external weights file differs from the SHA-256 recorded at bake time.

    Hashing gigabytes takes seconds, so a verified digest is cached (:mod:`crdiff_cli.storage.digest_cache`)
    under the file's size and modification time: an untouched file is checked by ``stat`` alone.
    Artifacts baked before the digest was recorded, and inline ones, have nothing to check here.
    """
    import onnx

    from crdiff_cli.storage.digest_cache import file_sha256

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if DATA_SHA256 not in props:
        return
    data = data_path(Path(path))
    if not data.is_file():
        raise ArtifactError(f"{path} keeps its weights in {data.name}, which is missing; copy it beside the .onnx")
    size = data.stat().st_size
    if str(size) != props.get(DATA_BYTES):
        raise ArtifactError(f"{data} has {size:,} bytes, but {props.get(DATA_BYTES)} were baked; the file is "
                            "truncated or replaced: copy or bake it again")
    if file_sha256(data) != props[DATA_SHA256]:
        raise ArtifactError(f"the weights in {data} do not match the SHA-256 recorded in {Path(path).name}; the "
                            "file is corrupt: copy or bake it again")


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CrdiffError(f"--opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}; the default {DEFAULT_OPSET} is "
                          "what TensorRT and ONNX Runtime are known to handle")


def read_onnx_metadata(path: Path) -> ArtifactMetadata:
    """The metadata of an ONNX artifact, without reading external weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{path} is not a readable ONNX model ({first_line(exc)}); it may be truncated "
                            "or corrupt") from None
    return ArtifactMetadata.from_strings({p.key: p.value for p in model.metadata_props}, str(path))


def initializer_bytes(path: Path) -> int:
    """Bytes of weights the graph stores (inline and external), from the protobuf alone."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}["length"])
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes
    return total


def check_onnx(path: Path) -> None:
    """``onnx.checker`` on the file (given the path, as external data requires)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ArtifactError(f"{path} fails the ONNX checker ({first_line(exc)})") from None
