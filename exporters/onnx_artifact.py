"""The ONNX artifact: one graph for ``e_d + k (e_p - e_d)``, every weight stored once.

Export traces :class:`~crdiff_cli.exporters.onnx_graph.DualGraph` with PyTorch's TorchScript exporter
(``dynamo=False``: fast, deduplicates the parameters the two passes share, opsets up to 20)
without constant folding, which would otherwise precompute the pruned pass's masked weights into a
second copy. The :mod:`.metadata` table goes into ``metadata_props``.

Weights live inside the ``.onnx`` file when they fit in protobuf's 2 GiB, else in ONE external data
file beside it, ``<name>.onnx.data`` (``model.onnx_data`` for a ``model.onnx``, Optimum's name; recorded as
``crdiff.external_data_file``). The TorchScript exporter writes one file per tensor for large models; they
are streamed into that single file, 4 KiB-aligned, without loading the model.

Integrity: every artifact records a SHA-256 of its initializers (:func:`initializers_sha256`; the same
whether they are inline or external), and :func:`check_weights` refuses a file whose weights no longer
match it before any runtime session is created. An external data file also has its size and whole-file
SHA-256 recorded: the size is checked first (a clear message for a truncated copy), the file's SHA-256
only for artifacts baked before the initializers digest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

from crdiff_cli.errors import CrdiffError, first_line
from crdiff_cli.exporters.metadata import ArtifactError, ArtifactMetadata
from crdiff_cli.storage.digest_cache import CHUNK, cached_digest, file_sha256

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
MAX_OPSET = 20  # the TorchScript exporter's limit; NVIDIA saw GroupNorm at opset 21 fail on TensorRT 10.7
INLINE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, less headroom for the graph itself
ALIGNMENT = 4096  # external tensors start on page boundaries, so runtimes may memory-map them
DATA_SHA256, DATA_BYTES = "crdiff.external_data_sha256", "crdiff.external_data_bytes"  # integrity of NAME.onnx.data
DATA_FILE_KEY = "crdiff.external_data_file"  # its name (artifacts baked before it: NAME.onnx.data)
INIT_SHA256, INIT_HASH_METHOD = "crdiff.initializers_sha256", "crdiff.initializers_hash_method"  # of every artifact
INIT_METHOD = "crdiff-onnx-initializers-sha256/1"


def data_path(path: Path) -> Path:
    """Where the external weights of ``path`` go: ``<name>.onnx.data`` beside it, but ``model.onnx_data`` for a
    ``model.onnx`` (a pipeline folder's component: the name Optimum and ONNX Runtime's SD tools expect)."""
    path = Path(path)
    return path.with_name("model.onnx_data" if path.name == "model.onnx" else path.name + ".data")


def export_onnx(unet, meta: ArtifactMetadata, path: Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None, poa_switch: bool = False) -> None:
    """Trace the dual graph of ``unet`` (with ``meta``'s spec and k) into ``path`` (+ ``path.data``).

    ``external_data``: None decides by size (external above 2 GiB), True/False forces it. ``poa_switch``
    writes the policy graph instead (:mod:`.onnx_policy`: input ``poa_pass`` picks both passes, dense or
    pruned; outputs ``out_sample`` and ``poa_delta``), with the same initializers. Writes scratch files
    into a folder beside ``path``; the caller makes the whole write atomic.
    """
    import shutil
    import tempfile

    import onnx
    import torch

    from crdiff_cli.exporters.onnx_graph import OUTPUT, dual_graph, dynamic_axes, example_inputs, trace_shape

    check_opset(opset)
    dtype = getattr(torch, meta.dtype)
    scratch = Path(tempfile.mkdtemp(prefix=".trace-", dir=path.parent))
    try:
        inputs = example_inputs(unet.config, 2, *trace_shape(unet.config), dtype=dtype)
        with dual_graph(unet, meta.spec, meta.k) as graph, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
            model = (_trace_policy(graph, inputs, scratch, opset) if poa_switch else
                     _trace(graph, inputs, [OUTPUT], dynamic_axes(graph.sdxl), scratch / "graph.onnx", opset))
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
            model.metadata_props.add(key=DATA_FILE_KEY, value=data_path(path).name)
        # The digest goes first: the file ends with metadata_props, and a copy cut exactly between two entries
        # must lose part of the table (refused as damaged), not the digest (which would read as unverified).
        table = [(p.key, p.value) for p in model.metadata_props]
        del model.metadata_props[:]
        digest = initializers_sha256(model, path.parent)[0]
        for key, value in [(INIT_SHA256, digest), (INIT_HASH_METHOD, INIT_METHOD), *table]:
            model.metadata_props.add(key=key, value=value)
        onnx.save_model(model, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _trace(module, inputs: dict, outputs: list[str], axes: dict, raw: Path, opset: int, *, params: bool = True):
    """Export ``module`` traced on ``inputs`` (graph inputs named as their keys) to ``raw``; returns it loaded
    without external data. ``params=False`` makes the weights graph inputs (named as their initializers would be).
    """
    import onnx
    import torch

    torch.onnx.export(module, tuple(inputs.values()), str(raw), dynamo=False, opset_version=opset,
                      input_names=list(inputs), output_names=outputs, dynamic_axes=axes, do_constant_folding=False,
                      export_params=params)
    return onnx.load(str(raw), load_external_data=False)


def _trace_policy(graph, inputs: dict, scratch: Path, opset: int):
    """The policy graph of ``graph`` (:mod:`.onnx_policy`) from three traces: the dense pass, whose weights land
    in ``scratch`` as the dual graph's do, the pruned pass without weights, and the combination of the two."""
    from crdiff_cli.exporters.onnx_graph import DELTA, OUTPUT, combination_axes, combination_inputs, dynamic_axes
    from crdiff_cli.exporters.onnx_policy import make_policy

    axes = dynamic_axes(graph.sdxl)
    model = _trace(graph.variant(0.0), inputs, [OUTPUT], axes, scratch / "graph.onnx", opset)
    pruned = _trace(graph.variant(1.0), inputs, [OUTPUT], axes, scratch / "pruned.onnx", opset, params=False)
    combination = _trace(graph.combination(), combination_inputs(graph.unet.config, inputs["sample"].dtype),
                         [OUTPUT, DELTA], combination_axes(), scratch / "combination.onnx", opset)
    make_policy(model, pruned, combination)
    return model


def _write_external(tensors, scratch: Path, target: Path) -> tuple[str, int]:
    """Move every initializer's bytes into ``target`` (aligned) and point the tensors at it.

    Bytes come from the exporter's one-file-per-tensor external data (large models) or from the
    tensor itself (``raw_data``); tensors in neither (none from the TorchScript exporter) stay inline.
    Returns the file's SHA-256 and size, recorded in the graph's metadata for :func:`check_weights`.
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


def initializers_sha256(model, folder: Path) -> tuple[str, list[Path]]:
    """The SHA-256 of ``model``'s initializers (method ``crdiff-onnx-initializers-sha256/1``), and the
    external data files it read (a relative ``location`` is resolved in ``folder``).

    For each initializer of the main graph in ascending order of name (Python string order): one line of
    compact JSON ``{"dtype":"FLOAT","name":...,"shape":[...]}`` (ONNX's data type name, sorted keys) plus
    ``\\n``, then the tensor's bytes, row-major, little-endian: ``raw_data`` for an inline tensor, the
    ``length`` bytes at ``offset`` of its ``location`` for an external one (read in chunks, never whole), so
    the digest is the same whether the weights are inline or external. ``model`` is loaded without its
    external data. A tensor in the typed fields (``float_data``, ...) hashes as the same bytes would in
    ``raw_data``; a string tensor as each element's byte length (8 bytes, little-endian) and bytes.
    """
    import onnx

    digest = hashlib.sha256()
    handles: dict[Path, object] = {}
    try:
        for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
            header = {"dtype": _dtype_name(tensor.data_type), "name": tensor.name, "shape": list(tensor.dims)}
            digest.update(json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n")
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                _hash_external(digest, tensor, Path(folder), handles)
            elif tensor.HasField("raw_data"):
                digest.update(tensor.raw_data)
            else:
                digest.update(_typed_bytes(tensor))
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest(), list(handles)


def _dtype_name(data_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:  # a number this onnx does not know (or a damaged file): hashed as the number
        return str(data_type)


def _hash_external(digest, tensor, folder: Path, handles: dict) -> None:
    """Feed ``tensor``'s external bytes to ``digest``; a short file just gives another digest."""
    entries = {e.key: e.value for e in tensor.external_data}
    file = folder / entries.get("location", "")
    if file not in handles:
        try:
            handles[file] = open(file, "rb")
        except OSError:
            raise ArtifactError(f"the weights of {tensor.name} are in {file}, which is missing or unreadable; "
                                "keep the .onnx.data beside its .onnx") from None
    try:
        offset, length = int(entries.get("offset", 0)), int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise ArtifactError(f"the external data entry of {tensor.name} is damaged ({entries}); re-bake or "
                            "re-download the artifact") from None
    handle = handles[file]
    handle.seek(offset)
    while length is None or length > 0:
        chunk = handle.read(CHUNK if length is None else min(CHUNK, length))
        if not chunk:
            break
        digest.update(chunk)
        if length is not None:
            length -= len(chunk)


def _typed_bytes(tensor) -> bytes:
    import onnx

    array = onnx.numpy_helper.to_array(tensor)
    if array.dtype == object:  # STRING
        return b"".join(len(v).to_bytes(8, "little") + v for v in (bytes(x) for x in array.reshape(-1)))
    return (array.byteswap() if sys.byteorder == "big" else array).tobytes()


def check_weights(path: Path) -> str | None:
    """Refuse the ONNX artifact at ``path`` if its weights differ from the digest recorded at bake time.

    Returns None when the weights are verified, or a one-line warning when there is nothing to check them
    against (an artifact baked before crdiff recorded :func:`initializers_sha256`, with inline weights).
    Hashing gigabytes takes seconds, so a digest is cached (:mod:`crdiff_cli.storage.digest_cache`) under
    the size and modification time of the ``.onnx`` and of its data file: an untouched artifact costs a
    ``stat`` of each and a read of the ``.onnx``'s top-level fields (:func:`metadata_props`).
    """
    path = Path(path)
    props = metadata_props(path)
    try:
        data = path.with_name(props.get(DATA_FILE_KEY, path.name + ".data"))
    except ValueError:  # a name with a separator, or empty: only a damaged or forged table has one
        raise ArtifactError(f"{path} names its external data {props[DATA_FILE_KEY]!r}, not a file beside it; "
                            "re-bake or re-download the artifact") from None
    if DATA_SHA256 in props:
        if not data.is_file():
            raise ArtifactError(f"{path} keeps its weights in {data.name}, which is missing; copy it beside the .onnx")
        size = data.stat().st_size
        if str(size) != props.get(DATA_BYTES):
            raise ArtifactError(f"{data} has {size:,} bytes, but {props.get(DATA_BYTES)} were baked; the file is "
                                "truncated or replaced: re-bake or re-download it")
        where = (f"the weights in {data} do not match the SHA-256 recorded in {path.name} when it was baked: the "
                 "files were modified or corrupted; re-bake or re-download them")
    else:
        where = (f"the weights in {path} do not match the SHA-256 recorded when it was baked: the file was "
                 "modified or corrupted; re-bake or re-download it")
    method = props.get(INIT_HASH_METHOD)
    if INIT_SHA256 in props and method == INIT_METHOD:
        def compute() -> tuple[str, list[Path]]:
            digest, external = initializers_sha256(_load_graph(path), path.parent)
            return digest, [path, *external]

        if cached_digest(f"{INIT_METHOD}:{path.resolve()}", compute) != props[INIT_SHA256]:
            raise ArtifactError(where)
        return None
    if DATA_SHA256 in props:  # baked before the initializers digest: every weight is in the data file
        if file_sha256(data) != props[DATA_SHA256]:
            raise ArtifactError(where)
        return None
    if INIT_SHA256 in props:
        return (f"{path} records its weights digest with method {method!r}, which this crdiff does not know: its "
                "weights are unverified; upgrade crdiff to have them checked")
    return (f"{path} was baked without a weights digest (crdiff {props.get('crdiff.crdiff_version', '?')}): its "
            "weights are unverified; re-bake it with this crdiff to have them checked on every load")


def _load_graph(path: Path):
    """The model at ``path`` without its external data; a damaged file is one :class:`ArtifactError`."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{path} is not a readable ONNX model ({first_line(exc)}); it may be truncated "
                            "or corrupt") from None


def metadata_props(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX model at ``path``, read without parsing its graph.

    Walks the top-level fields of the ``ModelProto`` wire format, seeking past all but
    ``metadata_props``, so a 2 GiB inline model costs a few small reads. A file that is not a well-formed
    sequence of fields (truncated, not protobuf) is one :class:`ArtifactError`.
    """
    import onnx

    wanted = onnx.ModelProto.DESCRIPTOR.fields_by_name["metadata_props"].number
    props: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            while f.tell() < size:
                tag = _varint(f)
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _varint(f)
                    continue
                skip = {1: 8, 5: 4}.get(wire)
                if wire == 2:
                    skip = _varint(f)
                if skip is None or field == 0 or f.tell() + skip > size:
                    raise ValueError(f"bad field {field} (wire type {wire}) at byte {f.tell():,}")
                if field == wanted and wire == 2:
                    entry = onnx.StringStringEntryProto.FromString(f.read(skip))
                    props[entry.key] = entry.value
                else:
                    f.seek(skip, 1)
    except ArtifactError:
        raise
    except Exception as exc:  # ValueError above, DecodeError of an entry, EOFError
        raise ArtifactError(f"{path} is not a readable ONNX model ({first_line(exc)}); it may be truncated "
                            "or corrupt") from None
    return props


def _varint(f) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError("the file ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CrdiffError(f"--opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}; the default {DEFAULT_OPSET} is "
                          "what TensorRT and ONNX Runtime are known to handle")


def read_onnx_metadata(path: Path) -> ArtifactMetadata:
    """The metadata of an ONNX artifact, without parsing its graph or reading its weights."""
    return ArtifactMetadata.from_strings(metadata_props(path), str(path))


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
