"""An ONNX artifact's external weights (NAME.onnx.data) are checked against the SHA-256 recorded at bake."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from crdiff_cli.cli import app


@pytest.fixture
def baked_external(load_tiny, tmp_path, monkeypatch):
    """A tiny ONNX artifact forced to keep its weights in a.onnx.data, with a private digest cache."""
    from crdiff_cli.exporters.bake import bake
    from crdiff_cli.pruning.spec import PruneSpec
    from crdiff_cli.pruning.ratios import Ratios
    from crdiff_cli.pruning.resolution import Resolution

    loaded = load_tiny("tiny")
    spec = PruneSpec.from_unet(loaded.unet, Ratios(0.2, 0.2, 0.2))
    out = tmp_path / "a.onnx"
    bake(loaded.unet, spec, k=1.5, resolution=Resolution(32, 32), family="sd15", out=out, external_data=True,
         verify=False)
    monkeypatch.setenv("CRDIFF_CACHE", str(tmp_path / "cache"))  # after the tiny model was loaded
    return out


def _flip_a_bit(path, keep_mtime: bool = False, where: float = 0.5):
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_digest_is_recorded_and_checked(baked_external):
    import onnx

    from crdiff_cli.storage.digest_cache import cache_file, file_sha256
    from crdiff_cli.exporters.metadata import ArtifactError
    from crdiff_cli.exporters.onnx_artifact import DATA_BYTES, DATA_SHA256, check_external_data, data_path

    data = data_path(baked_external)
    props = {p.key: p.value for p in onnx.load(str(baked_external), load_external_data=False).metadata_props}
    assert props[DATA_BYTES] == str(data.stat().st_size)
    check_external_data(baked_external)
    assert props[DATA_SHA256] == file_sha256(data) and str(data.resolve()) in cache_file().read_text()

    _flip_a_bit(data, keep_mtime=True)  # the fast path trusts (size, mtime): documented trade-off
    check_external_data(baked_external)
    _flip_a_bit(data, where=0.25)  # an ordinary change gets a new mtime: re-hashed, caught
    with pytest.raises(ArtifactError, match="do not match the SHA-256"):
        check_external_data(baked_external)
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        check_external_data(baked_external)
    data.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        check_external_data(baked_external)


def test_generate_refuses_a_corrupt_onnx_artifact_in_one_line(baked_external, tmp_path):
    from crdiff_cli.exporters.onnx_artifact import data_path

    _flip_a_bit(data_path(baked_external))
    result = CliRunner().invoke(app, ["generate", "--model", "tiny", "--artifact", str(baked_external), "--steps",
                                      "1", "--prompt", "a cube", "--out", str(tmp_path / "images")])
    assert result.exit_code == 2 and "do not match the SHA-256" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
