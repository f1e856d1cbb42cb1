"""The ONNX policy graph (``export_onnx(..., poa_switch=True)``): one graph for POA steps and one-pass steps.

Input ``poa_pass`` picks the step: 0 both passes (``out_sample`` as the dual graph's, ``poa_delta`` = e_p - e_d),
1 the dense pass alone, 2 the pruned pass alone (``poa_delta`` zeros). The graph stores the dual graph's
initializers, no more (the same ``initializers_sha256``), and each pass once. Built from the real tiny models and
run with ONNX Runtime's CPU provider; tolerances as in test_artifacts.py: relative error (max |diff| / max
|reference|) 1e-4 in fp32, 1e-2 in fp16.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from crdiff_cli.deploy.sessions import session_options
from crdiff_cli.dual.unet import DualUNet
from crdiff_cli.errors import CrdiffError, ParameterError
from crdiff_cli.exporters.metadata import ArtifactMetadata
from crdiff_cli.exporters.onnx_artifact import (INIT_SHA256, check_onnx, check_weights, data_path, export_onnx,
                                                initializer_bytes, initializers_sha256, metadata_props)
from crdiff_cli.exporters.onnx_graph import example_inputs, trace_shape
from crdiff_cli.exporters.onnx_runtime import has_poa_pass, open_session, run_session
from crdiff_cli.exporters.validate import TOLERANCES, unet_call
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.pruning.targets import target_weights

RATIOS = Ratios(0.3, 0.2, 0.25)
K = 1.3
NAMES = ("tiny", "tiny-sdxl")
FP32 = TOLERANCES["float32"]


def export_pair(loaded, folder: Path, stem: str, k: float = K, **kwargs) -> tuple[PruneSpec, Path, Path]:
    """``(spec, dual graph, policy graph)`` of ``loaded``'s UNet at ``k``, exported with the same metadata."""
    spec = PruneSpec.from_unet(loaded.unet, RATIOS)
    meta = ArtifactMetadata.describe(loaded.unet, spec, k, Resolution(64, 48), loaded.family)
    paths = folder / f"{stem}-dual.onnx", folder / f"{stem}-policy.onnx"
    export_onnx(loaded.unet, meta, paths[0], **kwargs)
    export_onnx(loaded.unet, meta, paths[1], poa_switch=True, **kwargs)
    return spec, *paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dirs):
    """``{name: (loaded, spec, dual graph, policy graph)}`` for both tiny models at k = 1.3, exported once."""
    from crdiff_cli.pipelines.loading import load_model

    folder = tmp_path_factory.mktemp("policy")
    exports = {}
    for name in NAMES:
        loaded = load_model(name)
        exports[name] = (loaded, *export_pair(loaded, folder, name))
    return exports


def inputs_of(loaded, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch 2 at the trace's latent size (odd: the explicit upsample-size path)."""
    return example_inputs(loaded.unet.config, 2, *trace_shape(loaded.unet.config), seed=seed)


def live(loaded, spec, inputs, k: float) -> torch.Tensor:
    """The live dual UNet's output at ``k`` (0: the dense UNet, 1: the pruned one)."""
    dual = DualUNet(loaded.unet, spec, k)
    try:
        return unet_call(dual, inputs)
    finally:
        dual.release()


def relative(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |got - expected| / max |scale| (``scale`` defaults to ``expected``), as the bake's validation measures."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    return float((got.float() - expected.float()).abs().max() / (expected if scale is None else scale).abs().max())


def all_nodes(graph):
    """Every node of ``graph`` and of the graphs nested in its nodes (``If`` branches)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for nested in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from all_nodes(nested)


def initializer_set(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    """``{name: (dtype, shape, bytes)}`` of the graph's initializers (external ones read from their file)."""
    tensors = onnx.load(str(path)).graph.initializer
    return {t.name: (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in tensors}


# --- structure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_policy_graph_adds_the_pass_input_and_the_delta_output(exported, name):
    _, _, dual_path, policy_path = exported[name]
    check_onnx(policy_path)
    dual, policy = (onnx.load(str(p)).graph for p in (dual_path, policy_path))
    assert list(policy.input)[:-1] == list(dual.input) and policy.input[-1].name == "poa_pass"
    pass_type = policy.input[-1].type.tensor_type
    assert pass_type.elem_type == onnx.TensorProto.INT64 and [d.dim_value for d in pass_type.shape.dim] == [1]
    assert [o.name for o in policy.output] == ["out_sample", "poa_delta"]
    for output in policy.output:
        assert output.type == dual.output[0].type  # float, [batch, 4, height, width]
    top = Counter(n.op_type for n in policy.node)
    assert top["If"] == 3 and set(top) == {"Constant", "Equal", "Not", "If"}  # the passes live in If branches
    for node in all_nodes(policy):  # the branches read the outer weights: no initializer outside the outer graph
        for attribute in node.attribute:
            assert not (attribute.HasField("g") and attribute.g.initializer)


@pytest.mark.parametrize("name", NAMES)
def test_policy_graph_stores_todays_initializers_once(exported, name):
    _, _, dual_path, policy_path = exported[name]
    assert initializer_set(policy_path) == initializer_set(dual_path)
    dual, policy = (onnx.load(str(p), load_external_data=False) for p in (dual_path, policy_path))
    digest = initializers_sha256(dual, dual_path.parent)[0]
    assert initializers_sha256(policy, policy_path.parent)[0] == digest
    assert metadata_props(policy_path)[INIT_SHA256] == metadata_props(dual_path)[INIT_SHA256] == digest
    assert check_weights(policy_path) is None
    assert initializer_bytes(policy_path) == initializer_bytes(dual_path)
    # Each pass is in the graph once: about the dual graph's node count (it shares a few nodes between its passes).
    nodes = sum(1 for _ in all_nodes(policy.graph)), sum(1 for _ in all_nodes(dual.graph))
    assert nodes[1] < nodes[0] < 1.3 * nodes[1]
    graph_bytes = [p.stat().st_size - initializer_bytes(p) for p in (policy_path, dual_path)]
    assert graph_bytes[1] < graph_bytes[0] < 1.5 * graph_bytes[1]


# --- outputs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_pass_0_is_the_dual_graphs_output_and_the_difference_of_the_passes(exported, name):
    loaded, spec, dual_path, policy_path = exported[name]
    inputs = inputs_of(loaded, seed=1)
    session = open_session(policy_path, provider="cpu")
    out, delta = run_session(session, inputs, 0)
    today = run_session(open_session(dual_path, provider="cpu"), inputs)
    assert relative(out, today) < FP32
    assert torch.equal(run_session(session, inputs), out)  # no poa_pass: both passes, as the dual graph
    dense, pruned = live(loaded, spec, inputs, 0.0), live(loaded, spec, inputs, 1.0)
    assert relative(out, live(loaded, spec, inputs, K)) < FP32
    # The difference is measured against the outputs' scale, and is far from zero on it (a wrong sign or zeros fail).
    assert relative(delta, pruned - dense, dense) < FP32
    assert float((pruned - dense).abs().max() / dense.abs().max()) > 100 * FP32


@pytest.mark.parametrize("name", NAMES)
def test_passes_1_and_2_are_the_dense_and_the_pruned_unet(exported, name):
    loaded, spec, _, policy_path = exported[name]
    inputs = inputs_of(loaded, seed=2)
    session = open_session(policy_path, provider="cpu")
    for poa_pass, expected in ((1, unet_call(loaded.unet, inputs)), (2, live(loaded, spec, inputs, 1.0))):
        out, delta = run_session(session, inputs, poa_pass)
        assert relative(out, expected) < FP32
        assert delta.shape == out.shape and delta.dtype == out.dtype and not delta.any()


@pytest.mark.parametrize("k", [0.0, 1.0])
def test_k_0_and_1_still_run_both_passes_at_pass_0(tmp_path, load_tiny, k):
    loaded = load_tiny("tiny")
    spec, dual_path, policy_path = export_pair(loaded, tmp_path, "tiny", k=k)
    inputs = inputs_of(loaded, seed=3)
    session = open_session(policy_path, provider="cpu")
    out, delta = run_session(session, inputs, 0)
    assert relative(out, run_session(open_session(dual_path, provider="cpu"), inputs)) < FP32
    assert torch.equal(out, run_session(session, inputs, 1 if k == 0 else 2)[0])  # the same branch computed it
    dense, pruned = live(loaded, spec, inputs, 0.0), live(loaded, spec, inputs, 1.0)
    assert relative(delta, pruned - dense, dense) < FP32


def test_fp16_policy_graph(tmp_path, load_tiny):
    loaded = load_tiny("tiny", "fp16")
    spec, dual_path, policy_path = export_pair(loaded, tmp_path, "tiny16")
    inputs = example_inputs(loaded.unet.config, 2, *trace_shape(loaded.unet.config), dtype=torch.float16, seed=4)
    session = open_session(policy_path, provider="cpu")
    out, delta = run_session(session, inputs, 0)
    assert out.dtype == delta.dtype == torch.float16
    assert relative(out, run_session(open_session(dual_path, provider="cpu"), inputs)) < TOLERANCES["float16"]
    for poa_pass in (1, 2):
        out, delta = run_session(session, inputs, poa_pass)
        assert delta.dtype == torch.float16 and not delta.any()
    assert initializer_set(policy_path) == initializer_set(dual_path)


# --- runtime -----------------------------------------------------------------------------------------

def optimized(path: Path, fold: bool, folder: Path):
    """The graph ONNX Runtime runs for ``path`` (its optimized model, saved at session creation)."""
    options = session_options(fold)
    options.optimized_model_filepath = str(folder / f"optimized-{fold}.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def test_mask_folding_folds_inside_the_pruned_branch_once_and_keeps_the_outputs(exported, tmp_path):
    loaded, _, _, policy_path = exported["tiny"]
    targets = sum(len(ws) for ws in target_weights(loaded.unet).values())
    wheres = {fold: sum(n.op_type == "Where" for n in all_nodes(optimized(policy_path, fold, tmp_path)))
              for fold in (True, False)}
    assert wheres[False] - wheres[True] == targets  # every mask folded, and each exactly once
    inputs = inputs_of(loaded, seed=5)
    folded, unfolded = (open_session(policy_path, provider="cpu", fold_masks=fold) for fold in (True, False))
    for poa_pass in (0, 1, 2):
        (out, delta), (out_unfolded, delta_unfolded) = (run_session(s, inputs, poa_pass) for s in (folded, unfolded))
        assert relative(out, out_unfolded) < FP32 and relative(delta, delta_unfolded, out_unfolded) < FP32


def test_external_weights_give_the_same_graph_and_outputs(exported, tmp_path):
    loaded, _, _, inline_path = exported["tiny-sdxl"]
    _, dual_path, policy_path = export_pair(loaded, tmp_path, "sdxl", external_data=True)
    onnx.checker.check_model(str(policy_path))
    model = onnx.load(str(policy_path), load_external_data=False)
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {
        data_path(policy_path).name}
    assert data_path(policy_path).stat().st_size == data_path(dual_path).stat().st_size
    assert metadata_props(policy_path)[INIT_SHA256] == metadata_props(inline_path)[INIT_SHA256]
    assert check_weights(policy_path) is None
    inputs = inputs_of(loaded, seed=6)
    external, inline = (open_session(p, provider="cpu") for p in (policy_path, inline_path))
    for poa_pass in (0, 1, 2):
        assert all(map(torch.equal, run_session(external, inputs, poa_pass), run_session(inline, inputs, poa_pass)))


def test_run_session_knows_which_graphs_take_a_pass(exported):
    loaded, _, dual_path, policy_path = exported["tiny"]
    dual, policy = (open_session(p, provider="cpu") for p in (dual_path, policy_path))
    assert has_poa_pass(policy) and not has_poa_pass(dual)
    inputs = inputs_of(loaded)
    assert isinstance(run_session(dual, inputs), torch.Tensor)
    with pytest.raises(CrdiffError, match="has no poa_pass input"):
        run_session(dual, inputs, 1)
    for bad in (3, -1):
        with pytest.raises(ParameterError, match=f"poa_pass={bad} must be 0"):
            run_session(policy, inputs, bad)
