"""crdiff_cli.exporters as a library: metadata, both artifact formats, validation, atomic writes.

Every artifact here is baked from the real tiny pipelines and read back by the real readers (ONNX through
ONNX Runtime's CPU provider). Tolerances: the safetensors artifact must equal the live dual UNet bit for
bit; the ONNX graph within relative error 1e-4 (max |diff| / max |reference|) in fp32, 1e-2 in fp16.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.dual.unet import DualUNet
from crdiff_cli.errors import CrdiffError
from crdiff_cli.exporters.artifacts import check_base, read_metadata
from crdiff_cli.exporters.bake import bake, verify_artifact
from crdiff_cli.exporters.metadata import (ArtifactError, ArtifactMetadata, threshold_bits, threshold_from_bits,
                                           weights_sha256)
from crdiff_cli.exporters.onnx_artifact import data_path, initializer_bytes
from crdiff_cli.exporters.onnx_graph import example_inputs
from crdiff_cli.exporters.onnx_runtime import OnnxUNet, open_session, run_session
from crdiff_cli.exporters.safetensors_artifact import load_safetensors_unet
from crdiff_cli.exporters.validate import (ShapeMismatchError, ToleranceExceededError, VerificationError, unet_call,
                                           validate_model_outputs, verification_cases)
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.pruning.targets import target_weights

RATIOS = Ratios(0.3, 0.2, 0.25)
RES = Resolution(64, 48)
K = 1.3
NAMES = ("tiny", "tiny-sdxl")


def baked(load_tiny, folder: Path, name: str, suffix: str, dtype: str = "fp32", **kwargs):
    loaded = load_tiny(name, dtype)
    spec = PruneSpec.from_unet(loaded.unet, RATIOS)
    result = bake(loaded.unet, spec, k=K, resolution=RES, family=loaded.family, out=folder / f"{name}{suffix}", **kwargs)
    return loaded, spec, result


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_dirs):
    """Both formats for both tiny models, baked (and verified) once: ``{(name, suffix): (loaded, spec, result)}``."""
    from crdiff_cli.pipelines.loading import load_model

    folder = tmp_path_factory.mktemp("artifacts")
    return {(n, s): baked(lambda name, dtype: load_model(name, dtype=dtype), folder, n, s)
            for n in NAMES for s in (".safetensors", ".onnx")}


def live_output(loaded, spec, inputs, k=K):
    dual = DualUNet(loaded.unet, spec, k)
    try:
        return unet_call(dual, inputs)
    finally:
        dual.release()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- metadata ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, value, bits", [("float32", 0.1, "0x3dcccccd"), ("float16", 0.0999755859375, "0x2e66"),
                                                ("bfloat16", 0.10009765625, "0x3dcd")])
def test_threshold_bits_are_exact_in_the_weights_dtype(dtype, value, bits):
    stored = float(torch.tensor(value, dtype=getattr(torch, dtype)))
    assert threshold_bits(stored, dtype) == bits
    assert threshold_from_bits(bits, dtype) == stored


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_metadata_round_trips(artifacts, name, suffix):
    loaded, spec, result = artifacts[(name, suffix)]
    meta = read_metadata(result.path)
    assert meta == result.meta
    assert meta.spec == spec and meta.k == K and meta.resolution == RES and meta.family == loaded.family
    assert meta.base_unet_sha256 == weights_sha256(loaded.unet.state_dict())
    assert meta.target_names == {g: [n for n, _ in ws] for g, ws in target_weights(loaded.unet).items()}
    check_base(meta, loaded.unet.config, name)  # the base it was baked from is accepted


def test_metadata_table_is_plain_json_strings(artifacts):
    table = artifacts[("tiny", ".safetensors")][2].meta.to_strings()
    assert all(isinstance(v, str) for v in table.values()) and all(k.startswith("crdiff.") for k in table)
    thresholds = json.loads(table["crdiff.thresholds"])
    for group, entry in thresholds.items():
        assert threshold_from_bits(entry["bits"], "float32") == entry["value"]
    broken = dict(table, **{"crdiff.thresholds": json.dumps({**thresholds, "up": {**thresholds["up"], "value": 0.5}})})
    with pytest.raises(ArtifactError, match="bits .* disagree"):
        ArtifactMetadata.from_strings(broken, "x")
    with pytest.raises(ArtifactError, match="format version 2"):
        ArtifactMetadata.from_strings(dict(table, **{"crdiff.format_version": "2"}), "x")


def test_weights_hash_sees_one_changed_element_and_ignores_dict_order(artifacts):
    state = artifacts[("tiny", ".safetensors")][0].unet.state_dict()
    digest = weights_sha256(state)
    assert weights_sha256(dict(reversed(list(state.items())))) == digest
    changed = {k: v.clone() for k, v in state.items()}
    first = sorted(changed)[0]
    changed[first].view(-1)[0] += 1
    assert weights_sha256(changed) != digest


def test_base_with_another_unet_config_is_refused(artifacts):
    meta = artifacts[("tiny-sdxl", ".onnx")][2].meta
    with pytest.raises(CrdiffError, match="another UNet config.*cross_attention_dim"):
        check_base(meta, artifacts[("tiny", ".onnx")][0].unet.config, "tiny")


# --- safetensors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_safetensors_is_dense_size_and_loads_without_base(artifacts, tiny_dirs, name):
    loaded, spec, result = artifacts[(name, ".safetensors")]
    dense_file = tiny_dirs[name] / "unet" / "diffusion_pytorch_model.safetensors"
    assert result.files == [result.path]
    assert result.size_bytes <= 1.01 * dense_file.stat().st_size
    unet, meta = load_safetensors_unet(result.path)
    assert all(not p.is_meta for p in unet.parameters())
    inputs = example_inputs(unet.config, 2, 6, 5, seed=11)
    rebuilt = DualUNet(unet, meta.spec, meta.k)
    assert torch.equal(unet_call(rebuilt, inputs), live_output(loaded, spec, inputs))  # bit for bit


# --- ONNX --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_onnx_graph_shares_weights_and_masks_in_graph(artifacts, name):
    loaded, spec, result = artifacts[(name, ".onnx")]
    model = onnx.load(str(result.path))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    dense_bytes = sum(p.numel() * p.element_size() for p in loaded.unet.parameters())
    assert initializer_bytes(result.path) <= dense_bytes  # every weight at most once
    consumers = Counter()
    for node in graph.node:
        for name_in in node.input:
            consumers[(name_in, node.op_type)] += 1
    masked = [n for n in graph.node if n.op_type == "Where" and n.input[1] in inits]
    assert len(masked) == sum(len(ws) for ws in target_weights(loaded.unet).values())
    for node in masked:  # the pruned weight is derived from the initializer the dense MatMul reads
        assert consumers[(node.input[1], "MatMul")] == 1 and consumers[(node.input[1], "Abs")] == 1
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # standard ops only (no contrib/custom ops)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    names = [i.name for i in graph.input]
    assert names == ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if name != "tiny" else [])
    assert [o.name for o in graph.output] == ["out_sample"]
    sample_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert sample_dims == ["batch", 4, "height", "width"]


@pytest.mark.parametrize("name", NAMES)
def test_onnx_matches_live_dual_at_other_shapes_with_and_without_mask_folding(artifacts, name):
    loaded, spec, result = artifacts[(name, ".onnx")]
    for batch, h, w in [(3, 7, 9), (1, 12, 4)]:
        inputs = example_inputs(loaded.unet.config, batch, h, w, seed=batch)
        expected = live_output(loaded, spec, inputs)
        for fold in (True, False):
            got = run_session(open_session(result.path, provider="cpu", fold_masks=fold), inputs)
            assert got.shape == expected.shape
            assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def test_external_data_is_one_file_and_gives_the_same_outputs(tmp_path, load_tiny, artifacts):
    _, _, inline = artifacts[("tiny-sdxl", ".onnx")]
    loaded, spec, result = baked(load_tiny, tmp_path, "tiny-sdxl", ".onnx", external_data=True, verify=False)
    assert result.files == [result.path, data_path(result.path)] and listing(tmp_path) == ["tiny-sdxl.onnx",
                                                                                           "tiny-sdxl.onnx.data"]
    model = onnx.load(str(result.path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert locations == {"tiny-sdxl.onnx.data"} and all(o % 4096 == 0 for o in offsets)
    onnx.checker.check_model(str(result.path))
    assert result.path.stat().st_size < 0.5 * inline.path.stat().st_size
    assert abs(initializer_bytes(result.path) - initializer_bytes(inline.path)) == 0
    inputs = example_inputs(loaded.unet.config, 2, 5, 7, seed=4)
    a = run_session(open_session(result.path, provider="cpu"), inputs)
    b = run_session(open_session(inline.path, provider="cpu"), inputs)
    assert torch.equal(a, b)


def test_fp16_onnx_bakes_verifies_and_stores_fp16_weights(tmp_path, load_tiny):
    loaded, spec, result = baked(load_tiny, tmp_path, "tiny", ".onnx", dtype="fp16")
    assert spec.dtype == "float16" and result.report.tolerance == 1e-2
    model = onnx.load(str(result.path))
    kinds = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if len(t.dims) == 2)
    assert set(kinds) == {"FLOAT16"}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_onnx_unet_adapter_serves_what_pipelines_read(artifacts):
    loaded, spec, result = artifacts[("tiny-sdxl", ".onnx")]
    adapter = OnnxUNet(open_session(result.path, provider="cpu"), result.meta)
    assert adapter.config.in_channels == 4 and adapter.dtype == torch.float32 and adapter.device.type == "cpu"
    assert adapter.add_embedding.linear_1.in_features == loaded.unet.add_embedding.linear_1.in_features
    inputs = example_inputs(loaded.unet.config, 2, 6, 6, seed=9)
    inputs["timestep"] = torch.tensor(500)  # pipelines pass a 0-d timestep
    out = unet_call(adapter, inputs)
    assert float((out - live_output(loaded, spec, inputs)).abs().max()) < 1e-4 * float(out.abs().max())
    with pytest.raises(CrdiffError, match="no input for cross_attention_kwargs"):
        adapter(inputs["sample"], 1, inputs["encoder_hidden_states"], cross_attention_kwargs={"scale": 1.0})


def test_io_binding_gives_identical_outputs(artifacts, tmp_path, load_tiny):
    """The bound path GPU providers take (tensors read and written in place) equals the numpy one bit for bit,
    for the dual graph and for each pass of a policy graph."""
    loaded, spec, result = artifacts[("tiny-sdxl", ".onnx")]
    inputs = example_inputs(loaded.unet.config, 2, 5, 7, seed=3)
    session = open_session(result.path, provider="cpu")
    assert torch.equal(run_session(session, inputs), run_session(session, inputs, bind=True))
    _, _, policy = baked(load_tiny, tmp_path, "tiny", ".onnx", verify=False, poa=PoaPolicy.parse("0:0.5"))
    inputs = example_inputs(policy.meta.unet_config, 2, 6, 6, seed=5)
    session = open_session(policy.path, provider="cpu")
    for one_pass in (0, 1, 2):
        plain, bound = run_session(session, inputs, one_pass), run_session(session, inputs, one_pass, bind=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, bound))
    assert OnnxUNet(session, policy.meta).bind is False and OnnxUNet(session, policy.meta, bind=True).bind


# --- validation --------------------------------------------------------------------------------------

def test_verification_cases_cover_two_sizes_and_two_batches():
    cases = verification_cases(Resolution(400, 560))
    assert {(c.height, c.width) for c in cases} == {(50, 70), (26, 38)} and {c.batch for c in cases} == {1, 2}


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_validation_against_another_k_fails_with_tolerance_error(artifacts, suffix):
    loaded, spec, result = artifacts[("tiny", suffix)]
    wrong = DualUNet(loaded.unet, spec, k=K + 0.2)
    try:
        with pytest.raises(ToleranceExceededError, match=r"relative error .* exceeds 0.0001 \(batch 1"):
            verify_artifact(result.path, loaded.unet, result.meta, reference=wrong)
    finally:
        wrong.release()


def test_validation_reports_shape_mismatch(artifacts):
    loaded, spec, result = artifacts[("tiny", ".onnx")]
    session = open_session(result.path, provider="cpu")
    with pytest.raises(ShapeMismatchError, match=r"shape \(1, 4, 8, 5\)"):
        validate_model_outputs(lambda i: live_output(loaded, spec, i), lambda i: run_session(session, i)[..., :5],
                               loaded.unet.config, verification_cases(RES))


def test_failed_verification_leaves_no_artifact(tmp_path, load_tiny):
    loaded = load_tiny("tiny")
    spec = PruneSpec.from_unet(loaded.unet, RATIOS)
    wrong = DualUNet(loaded.unet, spec, k=0.0)  # the dense model as the reference: must not match k = 1.3
    with pytest.raises(VerificationError, match="no artifact was written") as info:
        bake(loaded.unet, spec, k=K, resolution=RES, family="sd15", out=tmp_path / "a.onnx", reference=wrong)
    assert info.value.exit_code == 1
    assert listing(tmp_path) == []


@pytest.mark.parametrize("stage", ["writing onnx", "verifying against the live dual UNet"])
def test_interrupted_bake_leaves_nothing_and_keeps_the_unet_intact(tmp_path, load_tiny, stage):
    loaded = load_tiny("tiny")
    before = {k: v.clone() for k, v in loaded.unet.state_dict().items()}
    spec = PruneSpec.from_unet(loaded.unet, RATIOS)

    def interrupt(name):
        if name == stage:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bake(loaded.unet, spec, k=K, resolution=RES, family="sd15", out=tmp_path / "a.onnx", on_stage=interrupt)
    assert listing(tmp_path) == []
    after = loaded.unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, load_tiny):
    loaded = load_tiny("tiny")
    modules = [(name, type(m)) for name, m in loaded.unet.named_modules()]
    spec = PruneSpec.from_unet(loaded.unet, RATIOS)
    data_path(tmp_path / "a.onnx").write_text("a sidecar without its crdiff artifact: not ours")
    with pytest.raises(CrdiffError, match="not a crdiff artifact's external weights written by crdiff"):
        bake(loaded.unet, spec, k=K, resolution=RES, family="sd15", out=tmp_path / "a.onnx", verify=False,
             overwrite=True)
    data_path(tmp_path / "a.onnx").unlink()
    bake(loaded.unet, spec, k=K, resolution=RES, family="sd15", out=tmp_path / "a.onnx", verify=False)
    data_path(tmp_path / "a.onnx").write_text("old sidecar")  # beside crdiff's artifact: counts as its own
    with pytest.raises(CrdiffError, match="already exists"):
        bake(loaded.unet, spec, k=K, resolution=RES, family="sd15", out=tmp_path / "a.onnx", verify=False)
    result = bake(loaded.unet, spec, k=K, resolution=RES, family="sd15", out=tmp_path / "a.onnx", verify=False,
                  overwrite=True)
    assert listing(tmp_path) == ["a.onnx"] and result.files == [tmp_path / "a.onnx"]  # stale sidecar removed
    assert [(name, type(m)) for name, m in loaded.unet.named_modules()] == modules  # export swaps are undone
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(result.path).st_mode & 0o777 == 0o666 & ~umask  # shareable, like any file the user writes


# --- damaged and foreign files -----------------------------------------------------------------------

def foreign_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), str(path))
    return path


def truncated(source: Path, path: Path, keep: float) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def flipped(source: Path, path: Path) -> Path:
    data = bytearray(source.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda a, d, t: d["tiny"] / "unet" / "diffusion_pytorch_model.safetensors", "is not a crdiff artifact"),
    (lambda a, d, t: foreign_onnx(t / "relu.onnx"), "is not a crdiff artifact"),
    (lambda a, d, t: truncated(a[("tiny", ".safetensors")][2].path, t / "cut.safetensors", 0.5), "truncated"),
    (lambda a, d, t: truncated(a[("tiny", ".safetensors")][2].path, t / "cut.safetensors", 0.001), "not a readable safetensors"),
    (lambda a, d, t: truncated(a[("tiny", ".onnx")][2].path, t / "cut.onnx", 0.5), "not a readable ONNX model"),
    (lambda a, d, t: flipped(a[("tiny", ".safetensors")][2].path, t / "flip.safetensors"), "SHA-256 .* corrupt"),
    (lambda a, d, t: (t / "text.onnx").write_text("hello") and t / "text.onnx", "not a readable ONNX model"),
])
def test_damaged_or_foreign_files_give_one_clear_error(artifacts, tiny_dirs, tmp_path, make, message):
    path = make(artifacts, tiny_dirs, tmp_path)
    with pytest.raises(ArtifactError, match=message) as info:
        read_metadata(path)
        if path.suffix == ".safetensors":
            load_safetensors_unet(path)
        else:
            open_session(path)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_onnx_with_missing_external_data_gives_one_clear_error(tmp_path, load_tiny):
    _, _, result = baked(load_tiny, tmp_path, "tiny", ".onnx", external_data=True, verify=False)
    truncated(data_path(result.path), data_path(result.path), 0.5)
    assert read_metadata(result.path).k == K  # the metadata is in the .onnx itself
    with pytest.raises(ArtifactError, match="has [0-9,]+ bytes, but [0-9]+ were baked; the file is truncated"):
        open_session(result.path)  # the recorded size catches it before ONNX Runtime reads the file
