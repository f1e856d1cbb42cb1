"""ONNX artifacts are checked against the weights digest recorded at bake, whether their weights are inline or not.

Every ONNX artifact records ``crdiff.initializers_sha256`` (method ``crdiff-onnx-initializers-sha256/1``: the
initializers' names, dtypes, shapes and bytes, in name order), checked before each ONNX Runtime session and
cached by the files' (size, mtime). Artifacts above 2 GiB keep their weights in NAME.onnx.data, whose size and
whole-file SHA-256 are also recorded. Artifacts baked before the digest still open, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from crdiff_cli.cli import app
from crdiff_cli.exporters import onnx_artifact
from crdiff_cli.exporters.metadata import ArtifactError
from crdiff_cli.exporters.onnx_artifact import (DATA_BYTES, DATA_SHA256, INIT_HASH_METHOD, INIT_METHOD, INIT_SHA256,
                                                check_weights, data_path)
from crdiff_cli.exporters.onnx_runtime import open_session

HOUR_NS = 3600 * 10**9


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dirs):
    """Two tiny ONNX artifacts of the same weights, baked and verified once: ``inline.onnx`` (weights in the
    protobuf) and ``external.onnx`` (+ ``external.onnx.data``, chosen by size with the inline limit set to 0)."""
    from crdiff_cli.exporters.bake import bake
    from crdiff_cli.pipelines.loading import load_model
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.pruning.spec import PruneSpec

    folder = tmp_path_factory.mktemp("integrity")
    loaded = load_model("tiny")
    spec = PruneSpec.from_unet(loaded.unet, Ratios(0.2, 0.2, 0.2))
    checked = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_artifact, "check_weights", lambda path, _real=check_weights: checked.append(path) or _real(path))
        bake(loaded.unet, spec, k=1.5, resolution=Resolution(32, 32), family="sd15", out=folder / "inline.onnx")
        mp.setattr(onnx_artifact, "INLINE_LIMIT", 0)
        bake(loaded.unet, spec, k=1.5, resolution=Resolution(32, 32), family="sd15", out=folder / "external.onnx")
    assert len(checked) == 2  # bake's verification checked the digest of each staged artifact
    assert not data_path(folder / "inline.onnx").exists() and data_path(folder / "external.onnx").is_file()
    return folder


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """A private digest cache for each test."""
    from crdiff_cli.storage import digest_cache

    cache = tmp_path / "cache" / "digests.json"
    monkeypatch.setattr(digest_cache, "cache_file", lambda: cache)
    return cache


@pytest.fixture
def artifact(built, tmp_path):
    """``artifact(kind, aged=False)``: a private copy of ``inline`` or ``external`` in tmp_path; ``aged`` dates
    its files an hour back (an artifact that has not been touched for a while)."""
    def copy(kind: str, aged: bool = False) -> Path:
        path = tmp_path / f"{kind}.onnx"
        for source in (built / path.name, data_path(built / path.name)):
            if source.exists():
                shutil.copyfile(source, tmp_path / source.name)
                if aged:
                    past = time.time_ns() - HOUR_NS
                    os.utime(tmp_path / source.name, ns=(past, past))
        return path
    return copy


def props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def largest_initializer(path: Path) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of the largest initializer's bytes of the artifact at ``path``."""
    model = onnx.load(str(path), load_external_data=False)

    def length(tensor) -> int:
        external = {e.key: e.value for e in tensor.external_data}
        return int(external["length"]) if "length" in external else len(tensor.raw_data)

    tensor = max(model.graph.initializer, key=length)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        return path.parent / entries["location"], int(entries["offset"]), int(entries["length"])
    blob = path.read_bytes()
    start = blob.find(tensor.raw_data)
    assert len(tensor.raw_data) > 10_000 and start >= 0 and blob.find(tensor.raw_data, start + 1) == -1
    return path, start, len(tensor.raw_data)


def flip_a_bit(file: Path, position: int, keep_mtime: bool = False) -> None:
    before = file.stat()
    data = bytearray(file.read_bytes())
    data[position] ^= 0x10
    file.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def flip_largest_initializer(path: Path, keep_mtime: bool = False) -> Path:
    file, offset, length = largest_initializer(path)
    flip_a_bit(file, offset + length // 2, keep_mtime)
    return file


def without_digest(path: Path) -> Path:
    """``path`` re-saved as a crdiff from before the initializers digest would have written it."""
    model = onnx.load(str(path), load_external_data=False)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in (INIT_SHA256, INIT_HASH_METHOD)]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def generate(path: Path, out: Path):
    return CliRunner().invoke(app, ["generate", "--artifact", str(path), "--model", "tiny", "--prompt", "p", "--steps",
                                    "1", "--out", str(out)])


def refused_in_one_line(result, path: Path, out: Path) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert path.name in lines[0] and "modified or corrupted" in lines[0] and "re-bake or re-download" in lines[0]
    assert not out.exists() or not any(out.iterdir())
    return lines[0]


def count_hashing(monkeypatch) -> list:
    calls = []
    real = onnx_artifact.initializers_sha256
    monkeypatch.setattr(onnx_artifact, "initializers_sha256", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


# --- the digest ----------------------------------------------------------------------------------------

def documented_digest(path: Path) -> str:
    """``crdiff-onnx-initializers-sha256/1`` re-implemented from docs/artifacts.md, with onnx's own loader."""
    model = onnx.load(str(path))  # external data read in, whatever the file layout
    digest = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        header = {"name": tensor.name, "dtype": onnx.TensorProto.DataType.Name(tensor.data_type),
                  "shape": list(tensor.dims)}
        digest.update(json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n")
        digest.update(onnx.numpy_helper.to_array(tensor).astype("<f4").tobytes())  # the tiny model is float32
    return digest.hexdigest()


def test_digest_is_recorded_as_documented_and_does_not_depend_on_the_layout(built):
    inline, external = props(built / "inline.onnx"), props(built / "external.onnx")
    assert inline[INIT_HASH_METHOD] == external[INIT_HASH_METHOD] == INIT_METHOD == "crdiff-onnx-initializers-sha256/1"
    assert inline[INIT_SHA256] == external[INIT_SHA256] == documented_digest(built / "inline.onnx")
    assert DATA_SHA256 not in inline and external[DATA_BYTES] == str(data_path(built / "external.onnx").stat().st_size)
    assert check_weights(built / "inline.onnx") is None and check_weights(built / "external.onnx") is None


# --- corruption is refused ------------------------------------------------------------------------------

def test_bit_flip_in_inline_weights_is_refused_by_generate(artifact, tmp_path):
    path = artifact("inline")
    assert flip_largest_initializer(path) == path
    line = refused_in_one_line(generate(path, tmp_path / "images"), path, tmp_path / "images")
    assert "do not match the SHA-256" in line


def test_bit_flip_in_external_weights_is_refused_by_generate(artifact, tmp_path):
    path = artifact("external")
    assert flip_largest_initializer(path) == data_path(path)
    refused_in_one_line(generate(path, tmp_path / "images"), path, tmp_path / "images")


def test_truncated_or_missing_external_data_is_refused(artifact):
    path = artifact("external")
    data = data_path(path)
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        open_session(path)
    data.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        open_session(path)


# --- caching ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["inline", "external"])
def test_digest_is_computed_once_while_the_files_are_untouched(artifact, monkeypatch, digest_cache, kind):
    path = artifact(kind, aged=True)
    calls = count_hashing(monkeypatch)
    open_session(path)
    open_session(path)
    assert len(calls) == 1 and str(path.resolve()) in digest_cache.read_text()
    files = [path, data_path(path)] if kind == "external" else [path]
    for n, file in enumerate(files, start=2):  # a new mtime on either file: hashed again
        os.utime(file, ns=(time.time_ns() - HOUR_NS // 2,) * 2)
        open_session(path)
        open_session(path)
        assert len(calls) == n
    flipped = flip_largest_initializer(path, keep_mtime=True)  # same size and mtime: the cache trusts it, the
    check_weights(path)                                        # documented trade-off
    os.utime(flipped, ns=(time.time_ns() - HOUR_NS // 4,) * 2)  # what any change in place does: caught
    with pytest.raises(ArtifactError, match="modified or corrupted"):
        check_weights(path)


def test_a_change_right_after_hashing_is_caught_even_with_the_same_mtime(artifact, monkeypatch):
    from crdiff_cli.storage import digest_cache

    monkeypatch.setattr(digest_cache, "RACY_NS", 10 * 60 * 10**9)  # "right after", even on a stalled machine
    path = artifact("inline")  # just written: its mtime is too recent for a cached digest to be trusted
    calls = count_hashing(monkeypatch)
    check_weights(path)
    flip_largest_initializer(path, keep_mtime=True)
    with pytest.raises(ArtifactError, match="modified or corrupted"):
        check_weights(path)
    assert len(calls) == 2


# --- artifacts baked before the digest ------------------------------------------------------------------

def test_artifact_without_the_digest_runs_with_a_warning(artifact, tmp_path):
    path = without_digest(artifact("inline"))
    assert "unverified" in check_weights(path)
    warnings = []
    open_session(path, warn=warnings.append)
    assert len(warnings) == 1 and "unverified" in warnings[0] and "\n" not in warnings[0]
    result = generate(path, tmp_path / "images")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("warning:")] == [f"warning: {warnings[0]}"], result.stderr
    assert any(p.suffix == ".png" for p in (tmp_path / "images").iterdir())


def test_external_artifact_without_the_digest_is_still_checked_by_its_data_file_sha256(artifact, monkeypatch):
    path = without_digest(artifact("external"))
    assert check_weights(path) is None  # its weights are all in the data file, whose SHA-256 it records
    flip_largest_initializer(path)
    with pytest.raises(ArtifactError, match="modified or corrupted"):
        check_weights(path)
