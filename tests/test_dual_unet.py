"""DualUNet (pruned output amplification) on both tiny models, through the real diffusers pipelines.

Exactness is checked bit for bit on the decoded images: k = 0 is the dense pipeline, k = 1 is the
pipeline saved by `crdiff prune`, ratios 0/0/0 are dense at any k, and the two memory modes agree.
Memory claims are checked on tensor identity (data pointers), not on sizes alone.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from crdiff_cli.cli import app
from crdiff_cli.dual.apply import apply_crdiff
from crdiff_cli.dual.unet import DualUNet, attached_dual, resident_bytes
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pipelines.loading import load_model
from crdiff_cli.pipelines.schedulers import set_scheduler
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec, prune_, pruned_weight
from crdiff_cli.pruning.targets import target_weights

TINY = ("tiny", "tiny-sdxl")
RATIOS = "0.3/0.2/0.4"
SETTINGS = GenerationSettings(Resolution(64, 48), steps=3, guidance=7.5, negative_prompt="washed out")
PROMPT, SEED = "a lighthouse at dusk", 7


def image(pipe, scheduler: str | None = None) -> np.ndarray:
    set_scheduler(pipe, scheduler)
    return np.asarray(generate_image(pipe, PROMPT, SEED, SETTINGS))


def dual_model(name: str, ratios: str = RATIOS, k: float = 1.5, masks: str = "copy", dtype: str = "fp32"):
    """A freshly loaded tiny pipeline whose UNet is a DualUNet; returns (loaded, dual)."""
    loaded = load_model(name, dtype=dtype)
    spec = PruneSpec.from_unet(loaded.unet, Ratios.parse(ratios))
    return loaded, apply_crdiff(loaded.pipe, spec, k=k, masks=masks)


def prune_and_load(name: str, spec: PruneSpec, dtype: str = "fp32"):
    """A freshly loaded tiny model pruned in place (the pruned-only pipeline, without a folder)."""
    loaded = load_model(name, dtype=dtype)
    prune_(loaded.unet, spec)
    return loaded


@pytest.fixture(scope="module")
def pruned_dirs(tiny_dirs, tmp_path_factory) -> dict:
    """The pipeline folders `crdiff prune --ratios RATIOS` writes for each tiny model."""
    dirs = {}
    for name in TINY:
        dirs[name] = tmp_path_factory.mktemp("pruned") / name
        result = CliRunner().invoke(app, ["prune", "--model", name, "--ratios", RATIOS, "--out", str(dirs[name])])
        assert result.exit_code == 0, result.output
    return dirs


@pytest.fixture(scope="module")
def reference(pruned_dirs):
    """``reference(name, kind, scheduler=None)``: the dense or pruned-folder image, computed once."""
    cache = {}

    def get(name: str, kind: str, scheduler: str | None = None) -> np.ndarray:
        if (name, kind, scheduler) not in cache:
            model = name if kind == "dense" else str(pruned_dirs[name])
            cache[name, kind, scheduler] = image(load_model(model).pipe, scheduler)
        return cache[name, kind, scheduler]

    return get


# --- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("scheduler", [None, "ddim", "euler"])
def test_k0_is_dense_and_k1_is_the_pruned_folder(name, scheduler, reference):
    loaded, dual = dual_model(name, k=0.0)
    assert np.array_equal(image(loaded.pipe, scheduler), reference(name, "dense", scheduler))
    dual.k = 1.0
    assert np.array_equal(image(loaded.pipe, scheduler), reference(name, "pruned", scheduler))
    # not vacuous: pruning changes the image
    assert not np.array_equal(reference(name, "dense", scheduler), reference(name, "pruned", scheduler))


@pytest.mark.parametrize("name", TINY)
def test_zero_ratios_are_dense_at_any_k(name, reference):
    loaded, dual = dual_model(name, ratios="0/0/0", k=1.5)
    assert all(t is None for t in dual.spec.thresholds().values())
    assert np.array_equal(image(loaded.pipe), reference(name, "dense"))


@pytest.mark.parametrize("name", TINY)
def test_mask_modes_agree_and_amplification_is_neither_branch(name, reference):
    copy_img = image(dual_model(name, k=1.5, masks="copy")[0].pipe)
    fly_img = image(dual_model(name, k=1.5, masks="on-the-fly")[0].pipe)
    assert np.array_equal(copy_img, fly_img)
    assert not np.array_equal(copy_img, reference(name, "dense"))
    assert not np.array_equal(copy_img, reference(name, "pruned"))


@pytest.mark.parametrize("masks", ["copy", "on-the-fly"])
def test_k1_on_the_fly_matches_pruned_folder(masks, reference):
    loaded, _ = dual_model("tiny", k=1.0, masks=masks)
    assert np.array_equal(image(loaded.pipe), reference("tiny", "pruned"))


def test_unet_output_is_lerp_of_the_two_branches(tiny_dirs):
    """At the UNet level: e = lerp(e_d, e_p, k) exactly, i.e. e_d + k (e_p - e_d) up to rounding."""
    loaded, dual = dual_model("tiny", k=1.5)
    pruned_unet = prune_(load_model("tiny").unet, dual.spec)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 6, generator=g), torch.tensor(500),
            torch.randn(2, 77, loaded.unet.config.cross_attention_dim, generator=g))
    with torch.no_grad():
        dual.k = 0.0
        e_d = dual(*args).sample
        e_p = pruned_unet(*args).sample
        dual.k = 1.5
        e = dual(*args).sample
        e_tuple = dual(*args, return_dict=False)
    assert isinstance(e_tuple, tuple) and torch.equal(e_tuple[0], e)
    assert torch.equal(e, torch.lerp(e_d, e_p, 1.5))
    torch.testing.assert_close(e, e_d + 1.5 * (e_p - e_d), rtol=1e-5, atol=1e-6)
    assert not torch.equal(e_d, e_p)


def test_v_prediction_runs_through_the_dual(tiny_dirs):
    """SD2.1-style: the scheduler predicts v; k = 0 stays the dense image, k = 1 the pruned one."""
    def v_pipe(loaded):
        from diffusers import DDIMScheduler

        loaded.pipe.scheduler = DDIMScheduler.from_config(loaded.pipe.scheduler.config, prediction_type="v_prediction")
        return loaded.pipe

    loaded, dual = dual_model("tiny", k=0.0)
    dense = image(v_pipe(load_model("tiny")))
    assert np.array_equal(image(v_pipe(loaded)), dense)
    dual.k = 1.0
    assert np.array_equal(image(loaded.pipe), image(v_pipe(prune_and_load("tiny", dual.spec))))
    assert not np.array_equal(dense, image(load_model("tiny").pipe, "ddim"))  # v-prediction took effect


def test_bf16(tiny_dirs):
    loaded, dual = dual_model("tiny", k=0.0, dtype="bf16")
    assert dual.spec.dtype == "bfloat16" and loaded.unet.dtype == torch.bfloat16
    assert np.array_equal(image(loaded.pipe), image(load_model("tiny", dtype="bf16").pipe))
    dual.k = 1.0
    assert np.array_equal(image(loaded.pipe), image(prune_and_load("tiny", dual.spec, "bf16").pipe))
    dual.k = 1.5
    amplified = image(loaded.pipe)
    assert amplified.std() > 0 and not np.array_equal(amplified, image(load_model("tiny", dtype="bf16").pipe))


def test_set_spec_switches_ratios_in_place(reference):
    loaded, dual = dual_model("tiny", ratios="0.5/0.5/0.5", k=1.0)
    dual.set_spec(PruneSpec.from_unet(dual.unet, Ratios.parse(RATIOS)))
    assert np.array_equal(image(loaded.pipe), reference("tiny", "pruned"))
    dual.set_spec(PruneSpec.from_unet(dual.unet, Ratios.parse("0/0/0")))
    assert np.array_equal(image(loaded.pipe), reference("tiny", "dense"))


def test_spec_computed_on_the_wrapper_equals_spec_of_the_unet(tiny_dirs):
    """``loaded.unet`` is the DualUNet once attached; a spec taken from it is the inner UNet's (was: ran dense)."""
    loaded, dual = dual_model("tiny", k=1.0)
    assert loaded.unet is dual
    ratios = Ratios.parse(RATIOS)
    assert PruneSpec.from_unet(loaded.unet, ratios) == PruneSpec.from_unet(dual.unet, ratios)


# --- memory: one UNet, shared weights -------------------------------------------------------------

def weight_pointers(unet: nn.Module, dual: DualUNet) -> list[tuple[str, int]]:
    """Run the dual once at k = 1.5 and record, per Linear/Conv2d call, which weight storage it used."""
    calls, hooks = [], []
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_pre_hook(
                lambda m, _args, name=name: calls.append((name, m.weight.data_ptr()))))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dual(torch.randn(2, 4, 8, 6, generator=g), torch.tensor(10), torch.randn(2, 77, 32, generator=g))
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("masks", ["copy", "on-the-fly"])
def test_both_branches_use_the_dense_tensors_and_nothing_is_deep_copied(tiny_dirs, masks):
    loaded = load_model("tiny")
    unet = loaded.unet
    original = {name: p.data_ptr() for name, p in unet.named_parameters()}
    gc.collect()  # garbage UNets of earlier tests must not be collected mid-test and skew the count
    unets_before = sum(isinstance(o, type(unet)) for o in gc.get_objects())
    dual = apply_crdiff(loaded.pipe, PruneSpec.from_unet(unet, Ratios.parse(RATIOS)), k=1.5, masks=masks)
    assert sum(isinstance(o, type(unet)) for o in gc.get_objects()) <= unets_before  # no new UNet object
    assert {p.data_ptr() for p in dual.parameters()} == set(original.values())

    targets = {name.removesuffix(".weight") for ws in target_weights(unet).values() for name, _ in ws}
    calls = weight_pointers(unet, dual)
    dense_pass, pruned_pass = calls[: len(calls) // 2], calls[len(calls) // 2:]
    assert [n for n, _ in dense_pass] == [n for n, _ in pruned_pass]
    for (name, dense_ptr), (_, pruned_ptr) in zip(dense_pass, pruned_pass):
        assert dense_ptr == original[f"{name}.weight"], name
        if name in targets:
            assert pruned_ptr != dense_ptr, name  # a masked copy (resident or on the fly)
        else:
            assert pruned_ptr == dense_ptr, name  # the very same tensor
    if masks == "copy":
        masked = {copy.data_ptr() for copy in dual.masked_copies()}
        assert {ptr for name, ptr in pruned_pass if name in targets} <= masked


@pytest.mark.parametrize("name", TINY)
def test_resident_bytes(tiny_dirs, name):
    loaded = load_model(name)
    dense = resident_bytes(loaded.unet)
    target_bytes = sum(p.numel() * p.element_size() for ws in target_weights(loaded.unet).values() for _, p in ws)
    spec = PruneSpec.from_unet(loaded.unet, Ratios.parse(RATIOS))
    dual = DualUNet(loaded.unet, spec, masks="copy")
    assert resident_bytes(dual) == dense + target_bytes  # every group is pruned at RATIOS
    assert resident_bytes(dual) / dense <= 1 + target_bytes / dense
    dual.release()
    assert resident_bytes(DualUNet(loaded.unet, spec, masks="on-the-fly")) == dense


def test_masked_copies_live_in_one_buffer_that_release_frees(tiny_dirs):
    """Copy mode makes one allocation for all masked copies (so they do not scatter among the activations)."""
    loaded = load_model("tiny")
    targets = [p for ws in target_weights(loaded.unet).values() for _, p in ws]
    dual = DualUNet(loaded.unet, PruneSpec.from_unet(loaded.unet, Ratios.parse(RATIOS)), masks="copy")
    slots = dual.masked_copies()
    assert len(slots) == len(targets)
    assert len({s.untyped_storage().data_ptr() for s in slots}) == 1
    assert all(s.data_ptr() % 64 == 0 for s in slots)  # every copy as aligned as a fresh tensor
    starts = sorted((s.data_ptr(), s.numel() * s.element_size()) for s in slots)
    assert all(a + n <= b for (a, n), (b, _) in zip(starts, starts[1:]))  # no two copies overlap
    buffer = weakref.ref(slots[0]._base)
    del slots
    dual.release()
    gc.collect()
    assert buffer() is None


def test_release_restores_a_plain_unet(tiny_dirs):
    loaded = load_model("tiny")
    unet = loaded.unet
    params = dict(unet.named_parameters())
    keys = list(unet.state_dict())
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor(700), torch.randn(1, 77, 32, generator=g))
    with torch.no_grad():
        before = unet(*args).sample
        dual = DualUNet(unet, PruneSpec.from_unet(unet, Ratios.parse(RATIOS)), k=1.5)
        assert not torch.equal(dual(*args).sample, before)
        released = dual.release()
        after = released(*args).sample
    assert released is unet
    assert attached_dual(unet) is None
    assert list(unet.state_dict()) == keys
    assert all(p is params[n] for n, p in unet.named_parameters())
    assert torch.equal(after, before)


def test_unknown_mask_mode_is_a_user_error(tiny_readonly):
    unet = tiny_readonly["tiny"].unet
    with pytest.raises(CrdiffError, match="mask mode"):
        DualUNet(unet, PruneSpec.from_unet(unet, Ratios.parse(RATIOS)), masks="lazy")
    assert attached_dual(unet) is None


def test_spec_from_another_dtype_is_refused(tiny_readonly):
    """Thresholds are exact only in the weights' dtype: an fp32 spec on a bf16 UNet would prune other weights."""
    fp32_spec = PruneSpec.from_unet(tiny_readonly["tiny"].unet, Ratios.parse(RATIOS))
    unet = load_model("tiny", dtype="bf16").unet
    with pytest.raises(CrdiffError, match="recompute the spec"):
        DualUNet(unet, fp32_spec)
    assert attached_dual(unet) is None  # refused before any change
    DualUNet(unet, PruneSpec.from_unet(unet, Ratios.parse("0/0/0")))  # no thresholds: any dtype is fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pruned_weight_is_bitwise_prune_rule(dtype):
    """The fused mask equals ``prune_``'s ``masked_fill(|w| <= t, 0)`` bit for bit: ties at +-t, +-0, NaN."""
    w = torch.randn(10_007, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = float(w.abs().kthvalue(4_000).values)
    w[:5] = torch.tensor([t, -t, 0.0, -0.0, float("nan")]).to(dtype)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(pruned_weight(w, t).view(bits), w.masked_fill(w.abs() <= t, 0.0).view(bits))
