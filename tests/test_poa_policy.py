"""POA on part of the steps: the policy's arithmetic, and the dual UNet carrying it out in a real pipeline.

Oracles: the pipeline without a policy (the default must not change a bit), the dense and the pruned
pipelines (an empty window is one of them bit for bit), counted UNet calls against the cost formula, and a
cached step computed by hand from a separately pruned copy of the UNet and the recorded difference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from crdiff_cli import PoaPolicy, PruneSpec, Ratios, apply_crdiff, remove_crdiff
from crdiff_cli.dual.poa_steps import PoaTrace
from crdiff_cli.dual.unet import DualUNet
from crdiff_cli.errors import CrdiffError, ParameterError
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import prune_

RATIOS = Ratios.parse("0.3/0.2/0.25")


def settings(steps: int, scheduler: str = "ddim") -> GenerationSettings:
    return GenerationSettings(Resolution(40, 56), steps=steps, scheduler=scheduler)


def image(pipe, steps: int = 2, scheduler: str = "ddim") -> np.ndarray:
    from crdiff_cli.pipelines.schedulers import set_scheduler

    set_scheduler(pipe, scheduler)
    return np.asarray(generate_image(pipe, "a lighthouse at dusk", 3, settings(steps, scheduler)))


class CountedCalls:
    """Counts the inner UNet's forward calls (one per pass: CFG's two halves share a batched call)."""

    def __init__(self, unet):
        self.count = 0
        self._forward = unet.forward

        def counted(*args, **kwargs):
            self.count += 1
            return self._forward(*args, **kwargs)

        unet.forward = counted


@pytest.mark.parametrize("interval, outside, refresh, problem", [
    ("0.5:0.2", "dense", 1, "START > STOP"), ("-0.1:0.5", "dense", 1, "0 <= START"), ("0:1.5", "dense", 1, "STOP <= 1"),
    ("0:nan", "dense", 1, "0 <= START"), ("0.3", "dense", 1, "is not START:STOP"), ("a:b", "dense", 1, "START:STOP"),
    ("0:1", "both", 1, "is not a pass"), ("0:1", "dense", 0, "whole number >= 1"), ("0:1", "dense", 2.5, ">= 1")])
def test_bad_policies_are_refused_naming_the_parameter(interval, outside, refresh, problem):
    with pytest.raises(ParameterError, match=problem) as info:
        PoaPolicy.parse(interval, outside, refresh)
    assert info.value.param in ("poa_interval", "poa_outside", "poa_refresh")


@pytest.mark.parametrize("policy, steps, passes", [
    (PoaPolicy(), 30, 60), (PoaPolicy((0, 0.3)), 30, 39), (PoaPolicy((0, 0.3)), 10, 13),
    (PoaPolicy(refresh=4), 8, 10), (PoaPolicy(refresh=4), 30, 38), (PoaPolicy((0, 0)), 7, 7),
    (PoaPolicy((0.5, 1), refresh=2), 10, 13), (PoaPolicy((0.2, 0.6), "pruned"), 10, 14)])
def test_passes_follow_the_cost_model(policy, steps, passes):
    assert policy.passes(steps) == passes
    kinds = [policy.step_kind(i, steps) for i in range(steps)]
    assert kinds.count("both") * 2 + (steps - kinds.count("both")) == passes


def test_refresh_counts_from_the_windows_first_step():
    policy = PoaPolicy((0.5, 1), refresh=2)
    assert [policy.step_kind(i, 10) for i in range(10)] == ["dense"] * 5 + ["both", "cached", "both", "cached", "both"]


@pytest.mark.parametrize("label", ["", "@0:0.3", "@0.2:1+pruned", "/refresh4", "@0:0.5/refresh2", "@0.1:0.9+pruned/refresh3"])
def test_labels_and_dicts_round_trip(label):
    policy = PoaPolicy.from_label(label)
    assert policy.label() == label
    assert PoaPolicy.from_dict(policy.to_dict()) == policy


def test_default_policy_is_full_crdiff_bit_for_bit(load_tiny):
    loaded = load_tiny("tiny")
    apply_crdiff(loaded.pipe, RATIOS, k=1.3)
    before = image(loaded.pipe, 3)
    apply_crdiff(loaded.pipe, RATIOS, k=1.3, poa=PoaPolicy.parse("0:1", "pruned", 1))
    assert np.array_equal(image(loaded.pipe, 3), before)


@pytest.mark.parametrize("outside, k_of_oracle", [("dense", 0.0), ("pruned", 1.0)])
def test_an_empty_window_is_the_one_pass_pipeline_bit_for_bit(load_tiny, outside, k_of_oracle):
    loaded = load_tiny("tiny")
    apply_crdiff(loaded.pipe, RATIOS, k=k_of_oracle)
    oracle = image(loaded.pipe, 3)
    if outside == "dense":
        remove_crdiff(loaded.pipe)
        assert np.array_equal(image(loaded.pipe, 3), oracle)  # k = 0 is the plain pipeline
    apply_crdiff(loaded.pipe, RATIOS, k=1.5, poa=PoaPolicy((0.4, 0.4), outside))
    assert np.array_equal(image(loaded.pipe, 3), oracle)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("policy, steps", [(PoaPolicy((0, 0.3)), 10), (PoaPolicy(refresh=4), 8), (PoaPolicy(), 4),
                                           (PoaPolicy((0.5, 1), "pruned", 2), 6)])
def test_counted_unet_passes_equal_the_formula(load_tiny, scheduler, policy, steps):
    loaded = load_tiny("tiny")
    calls = CountedCalls(loaded.unet)
    apply_crdiff(loaded.pipe, RATIOS, k=1.5, poa=policy)
    image(loaded.pipe, steps, scheduler)
    assert calls.count == policy.passes(steps)


@pytest.mark.parametrize("k", [1.5, 0.3])
def test_a_cached_step_is_the_hand_computation_from_the_recorded_difference(load_tiny, k):
    loaded = load_tiny("tiny")
    pruned_unet = prune_(copy.deepcopy(loaded.unet), PruneSpec.from_unet(loaded.unet, RATIOS))
    plain_unet = copy.deepcopy(loaded.unet)
    dual = apply_crdiff(loaded.pipe, RATIOS, k=k, poa=PoaPolicy(refresh=2))
    seen = []
    forward = dual.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((args, kwargs, out[0].clone()))  # pipelines ask for tuples
        return out

    dual.forward = recording
    image(loaded.pipe, 2)
    assert len(seen) == 2
    with torch.no_grad():
        (args0, kwargs0, out0), (args1, kwargs1, out1) = seen
        dense0, pruned0 = plain_unet(*args0, **kwargs0)[0], pruned_unet(*args0, **kwargs0)[0]
        delta = pruned0 - dense0
        assert torch.equal(out0, torch.lerp(dense0, pruned0, k))  # step 0 ran both passes
        if k >= 0.5:  # the pruned pass: the stale difference weighs |k - 1|
            expected = pruned_unet(*args1, **kwargs1)[0] - delta * (1 - k)
        else:
            expected = plain_unet(*args1, **kwargs1)[0] + k * delta
    assert torch.equal(out1, expected)


def test_the_trace_records_the_difference_per_step(load_tiny):
    loaded = load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS, k=1.5)
    dual.poa.trace = PoaTrace()
    dual.poa.trace.label = "first"
    image(loaded.pipe, 3)
    entries = dual.poa.trace.entries
    assert [e["step"] for e in entries] == [0, 1, 2] and entries[0]["cos_prev"] is None
    assert all(-1 <= e["cos_prev"] <= 1 for e in entries[1:]) and all(e["delta_norm"] > 0 for e in entries)
    assert all(e["share"] > 0 and e["image"] == "first" for e in entries)
    dual.poa.trace.label = "second"
    image(loaded.pipe, 3)  # a second image starts a new run: no cosine against the previous image's last step
    assert [e["cos_prev"] is None for e in dual.poa.trace.entries[3:]] == [True, False, False]


def test_a_policy_needs_the_pipelines_schedule(load_tiny):
    loaded = load_tiny("tiny")
    dual = DualUNet(loaded.unet, PruneSpec.from_unet(loaded.unet, RATIOS), poa=PoaPolicy((0, 0.5)))
    sample = torch.zeros(1, 4, 8, 8)
    with pytest.raises(CrdiffError, match="needs the pipeline's schedule"):
        dual(sample, torch.tensor(500), torch.zeros(1, 77, 32))
    loaded.pipe.scheduler.set_timesteps(4)
    dual.poa.bind(loaded.pipe)
    with pytest.raises(CrdiffError, match="is not in the pipeline scheduler's timesteps"):
        dual(sample, torch.tensor(3), torch.zeros(1, 77, 32))


def test_save_pretrained_keeps_the_policy(load_tiny, tmp_path):
    from diffusers import DiffusionPipeline

    loaded = load_tiny("tiny")
    policy = PoaPolicy((0, 0.5), "pruned", 2)
    apply_crdiff(loaded.pipe, RATIOS, k=1.5, poa=policy)
    loaded.pipe.save_pretrained(tmp_path / "saved")
    before = image(loaded.pipe, 4)  # after saving: image() swaps the scheduler
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert pipe.unet.poa.policy == policy
    pipe.unet.poa.bind(pipe)
    assert np.array_equal(image(pipe, 4), before)


def test_generate_records_the_policy_and_writes_the_trace(tmp_path, tiny_dirs):
    import json

    from PIL import Image

    from helpers import invoke, ok

    out = tmp_path / "out"
    args = ["generate", "--model", "tiny", "--prompt", "a boat", "--res", "48x40", "--steps", "4", "--scheduler", "ddim",
            "-n", "2", "--ratios", "0.3/0.2/0.25", "--poa-interval", "0:0.5", "--poa-outside", "pruned", "--trace-poa",
            "--out", out]
    result = ok(invoke(*args))
    assert "POA 0:0.5+pruned (1.50x dense passes)" in " ".join(result.stdout.split())
    params = json.loads(Image.open(out / "0_0.png").text["crdiff"])
    assert params["poa"] == {"interval": "0:0.5", "outside": "pruned", "refresh": 1}
    trace = json.loads((out / "poa_trace.json").read_text())
    assert trace["format"] == "crdiff-poa-trace/1" and trace["poa"] == params["poa"]
    assert [(e["image"], e["step"]) for e in trace["steps"]] == [("0_0", 0), ("0_0", 1), ("0_1", 0), ("0_1", 1)]
    assert Image.open(out / "poa_trace.png").size == (900, 560)
    ok(invoke(*args, "--overwrite"))  # the trace files are crdiff's own: --overwrite replaces them
    assert sorted(p.name for p in out.iterdir()) == ["0_0.png", "0_1.png", "manifest.json", "poa_trace.json",
                                                     "poa_trace.png"]


def test_an_artifact_carries_its_policy_and_onnx_without_the_switch_refuses_one(tmp_path, tiny_dirs):
    import json

    from PIL import Image

    from helpers import invoke, ok

    common = ["--model", "tiny", "--ratios", "0.3/0.2/0.25", "--k", "1.3"]
    ok(invoke("bake", *common, "--res", "48x40", "--poa-refresh", "2", "--out", tmp_path / "a.safetensors"))
    gen = ["generate", "--model", "tiny", "--prompt", "a boat", "--steps", "2", "--scheduler", "ddim"]
    ok(invoke(*gen, "--artifact", tmp_path / "a.safetensors", "--out", tmp_path / "from_artifact"))
    ok(invoke(*gen, *common, "--res", "48x40", "--poa-refresh", "2", "--out", tmp_path / "live"))
    png = {name: Image.open(tmp_path / name / "0_0.png") for name in ("from_artifact", "live")}
    assert json.loads(png["from_artifact"].text["crdiff"])["poa"]["refresh"] == 2
    assert np.array_equal(*(np.asarray(image) for image in png.values()))
    ok(invoke("bake", *common, "--res", "48x40", "--no-verify", "--out", tmp_path / "full.onnx"))
    result = invoke(*gen, "--artifact", tmp_path / "full.onnx", "--poa-interval", "0:0.5", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "baked for full POA only" in result.stderr and not (tmp_path / "o").exists()
    traced = invoke(*gen, "--artifact", tmp_path / "full.onnx", "--trace-poa", "--out", tmp_path / "o")
    assert traced.exit_code == 2 and "does not return" in traced.stderr and not (tmp_path / "o").exists()


def test_an_onnx_artifact_with_the_switch_follows_the_policy_like_the_live_path(tmp_path, tiny_dirs):
    """Baked with a refresh policy: verified pass by pass at bake; images within the ONNX tolerance of the live
    path under the same policy, and different from the same graph run at full POA (the policy is followed)."""
    import json

    from PIL import Image

    from helpers import invoke, ok

    common = ["--model", "tiny", "--ratios", "0.3/0.2/0.25", "--k", "1.3"]
    ok(invoke("bake", *common, "--res", "48x40", "--poa-interval", "0:0.75", "--poa-refresh", "2",
              "--out", tmp_path / "p.onnx"))
    gen = ["generate", "--model", "tiny", "--prompt", "a boat", "--steps", "4", "--scheduler", "ddim"]
    ok(invoke(*gen, "--artifact", tmp_path / "p.onnx", "--trace-poa", "--out", tmp_path / "onnx"))
    ok(invoke(*gen, *common, "--res", "48x40", "--poa-interval", "0:0.75", "--poa-refresh", "2",
              "--out", tmp_path / "live"))
    ok(invoke(*gen, "--artifact", tmp_path / "p.onnx", "--poa-interval", "0:1", "--poa-refresh", "1",
              "--out", tmp_path / "full"))
    images = {n: np.asarray(Image.open(tmp_path / n / "0_0.png")).astype(int) for n in ("onnx", "live", "full")}
    assert np.abs(images["onnx"] - images["live"]).max() <= 2
    assert np.abs(images["onnx"] - images["full"]).max() > 2
    trace = json.loads((tmp_path / "onnx" / "poa_trace.json").read_text())
    assert [e["step"] for e in trace["steps"]] == [0, 2]  # both passes at steps 0 and 2; 1 cached; 3 dense


def test_compare_makes_the_dense_image_whatever_the_policy(tmp_path, tiny_dirs):
    from PIL import Image

    from helpers import invoke, ok

    args = ["generate", "--model", "tiny", "--prompt", "a boat", "--res", "48x40", "--steps", "2", "--scheduler", "ddim",
            "--ratios", "0.3/0.2/0.25"]
    ok(invoke(*args, "--poa-interval", "0:0.5", "--poa-outside", "pruned", "--compare", "--out", tmp_path / "c"))
    ok(invoke(*args, "--dense", "--out", tmp_path / "d"))
    compared, dense = (np.asarray(Image.open(p)) for p in (tmp_path / "c" / "0_0_dense.png", tmp_path / "d" / "0_0.png"))
    assert np.array_equal(compared, dense)
