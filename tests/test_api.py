"""The public library API: ``apply_crdiff`` / ``remove_crdiff`` on a diffusers pipeline, as a diffusers user calls it.

Oracles: the pipeline before CR-Diff (remove gives it back bit for bit), a dual UNet built afresh on the same
weights (a changed weight must give what a fresh one gives), a model pruned by the plain definition (a custom
target filter), and the saved-and-reloaded pipeline (the same images).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import crdiff_cli
from crdiff_cli import DualUNet, ParameterError, PruneSpec, Ratios, apply_crdiff, remove_crdiff
from crdiff_cli.dual.unet import attached_dual
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.targets import target_weights

RATIOS = "0.3/0.2/0.25"
SETTINGS = GenerationSettings(Resolution(40, 56), steps=2)


def image(pipe) -> np.ndarray:
    return np.asarray(generate_image(pipe, "a lighthouse at dusk", 3, SETTINGS))


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(1, 77, 32, generator=g))
    with torch.no_grad():
        return unet(*args).sample


def test_the_api_is_exported_from_the_package_root():
    assert {"apply_crdiff", "remove_crdiff", "DualUNet", "PruneSpec", "Ratios", "ParameterError"} <= set(crdiff_cli.__all__)
    assert crdiff_cli.apply_crdiff is apply_crdiff


@pytest.mark.parametrize("source", ["text", "ratios", "spec"])
def test_every_ratio_source_gives_the_same_dual_unet(load_tiny, source):
    loaded = load_tiny("tiny")
    spec = PruneSpec.from_unet(loaded.unet, Ratios.parse(RATIOS))
    ratios = {"text": RATIOS, "ratios": Ratios.parse(RATIOS), "spec": spec}[source]
    dual = apply_crdiff(loaded.pipe, ratios, k=1.2)
    assert loaded.pipe.unet is dual and isinstance(dual, DualUNet)
    assert dual.spec.thresholds() == spec.thresholds() and dual.k == 1.2


def test_a_profile_name_is_a_ratio_source(load_tiny):
    loaded = load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, "sd15@400x560")
    assert str(dual.spec.ratios) == str(crdiff_cli.get_profile("sd15@400x560").ratios)
    assert dual.k == 1.5 and dual.masks == "copy"  # the defaults


def test_apply_then_remove_gives_the_original_pipeline_bit_for_bit(load_tiny):
    loaded = load_tiny("tiny")
    plain = loaded.pipe.unet
    before = image(loaded.pipe)
    state = {name: t.clone() for name, t in plain.state_dict().items()}
    apply_crdiff(loaded.pipe, RATIOS, k=1.5)
    assert not np.array_equal(image(loaded.pipe), before)
    assert remove_crdiff(loaded.pipe) is plain and loaded.pipe.unet is plain
    assert attached_dual(plain) is None
    assert np.array_equal(image(loaded.pipe), before)
    assert all(torch.equal(t, state[name]) for name, t in plain.state_dict().items())
    assert remove_crdiff(loaded.pipe) is plain  # nothing to remove: a no-op


def test_applying_twice_replaces_the_first(load_tiny):
    """The second call states the whole configuration; it never stacks a dual UNet on a dual UNet."""
    loaded, fresh = load_tiny("tiny"), load_tiny("tiny")
    first = apply_crdiff(loaded.pipe, "0.5/0.5/0.5", k=3.0)
    second = apply_crdiff(loaded.pipe, RATIOS, k=1.2, masks="on-the-fly")
    assert loaded.pipe.unet is second and second.unet is first.unet is fresh_unet(loaded)
    assert attached_dual(second.unet) is second
    apply_crdiff(fresh.pipe, RATIOS, k=1.2, masks="on-the-fly")
    assert np.array_equal(image(loaded.pipe), image(fresh.pipe))
    calls = []
    second.unet.register_forward_hook(lambda *_: calls.append(1))
    unet_output(loaded.pipe.unet)
    assert len(calls) == 2  # one dense and one pruned pass per call, not four


def fresh_unet(loaded):
    return attached_dual(loaded.pipe.unet).unet


def test_wrapping_a_dual_unet_is_refused(load_tiny):
    loaded = load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS)
    spec = PruneSpec.from_unet(dual.unet, Ratios.parse(RATIOS))
    with pytest.raises(CrdiffError, match="already has CR-Diff applied"):
        DualUNet(dual, spec)
    with pytest.raises(CrdiffError, match="already has CR-Diff applied"):
        DualUNet(dual.unet, spec)


def test_a_weight_changed_after_applying_leaves_no_stale_masked_copy(load_tiny):
    """Copy mode must give what a dual UNet built afresh on the changed weights gives, with or without set_spec."""
    loaded, oracle = load_tiny("tiny"), load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS, k=1.5, masks="copy")
    unet_output(dual)  # the masked copies are made and used once
    thresholds = dual.spec.thresholds()
    for unet in (dual.unet, oracle.unet):  # scale the largest weights of one layer: no threshold moves
        _, weight = target_weights(unet)["up"][0]
        with torch.no_grad():
            weight[weight.abs() > weight.abs().max() / 2] *= 1.5
    respec = PruneSpec.from_unet(dual.unet, Ratios.parse(RATIOS))
    assert respec.thresholds() == thresholds
    expected = unet_output(apply_crdiff(oracle.pipe, respec, k=1.5, masks="copy"))
    assert torch.equal(unet_output(dual), expected)  # noticed at the pruned pass
    dual.set_spec(respec)
    assert torch.equal(unet_output(dual), expected)
    with torch.no_grad():  # a replaced parameter (as fusing a LoRA may do) is noticed too
        module = dual.unet.get_submodule(target_weights(dual.unet)["down"][0][0].removesuffix(".weight"))
        module.weight = torch.nn.Parameter(module.weight * 1.25)
        omodule = oracle.unet.get_submodule(target_weights(oracle.unet)["down"][0][0].removesuffix(".weight"))
        omodule.weight = torch.nn.Parameter(omodule.weight * 1.25)
    spec = PruneSpec.from_unet(oracle.unet, Ratios.parse(RATIOS))
    dual.set_spec(spec)
    assert torch.equal(unet_output(dual), unet_output(apply_crdiff(oracle.pipe, spec, k=1.5, masks="on-the-fly")))


def test_a_custom_target_filter_prunes_exactly_what_it_chooses(load_tiny):
    """Only the chosen layers, by the plain definition (group-global kth value, |w| <= t zeroed)."""
    def only_queries(name, module):
        return "down" if name.startswith("down_blocks") and name.endswith("attn1.to_q") else None

    loaded, oracle = load_tiny("tiny"), load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, "0.4/0.4/0.4", k=1.0, target_filter=only_queries)
    chosen = [(n, m) for n, m in oracle.unet.named_modules() if only_queries(n, m)]
    assert chosen and dual.spec.groups["down"].layers == len(chosen)
    assert dual.spec.groups["mid"].targets == dual.spec.groups["up"].targets == 0
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for _, m in chosen])
    t = magnitudes.kthvalue(int(magnitudes.numel() * 0.4)).values
    with torch.no_grad():
        for _, m in chosen:
            m.weight[m.weight.abs() <= t] = 0.0
    assert torch.equal(unet_output(dual), unet_output(oracle.unet))
    with pytest.raises(CrdiffError, match="custom target_filter"):
        dual.save_pretrained("unused")


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_save_pretrained_round_trip_gives_the_same_images(load_tiny, tmp_path, name):
    from diffusers import DiffusionPipeline

    loaded = load_tiny(name)
    dual = apply_crdiff(loaded.pipe, RATIOS, k=1.3, masks="on-the-fly")
    before = image(loaded.pipe)
    loaded.pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "unet" / "crdiff.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(again.unet, DualUNet)
    assert (again.unet.k, again.unet.masks, again.unet.spec) == (1.3, "on-the-fly", dual.spec)
    assert np.array_equal(image(again), before)
    remove_crdiff(again)  # the saved UNet is the dense one
    assert np.array_equal(image(again), image(remove_crdiff(loaded.pipe) and loaded.pipe))


def test_controlnet_from_unet_works_while_applied(load_tiny):
    from diffusers import ControlNetModel

    loaded = load_tiny("tiny")
    plain_keys = list(loaded.unet.state_dict())
    apply_crdiff(loaded.pipe, RATIOS)
    assert list(loaded.pipe.unet.unet.state_dict()) == plain_keys
    ControlNetModel.from_unet(loaded.pipe.unet.unet)
    ControlNetModel.from_unet(loaded.pipe.unet)


def test_library_errors_name_parameters_not_flags(load_tiny):
    loaded = load_tiny("tiny")
    with pytest.raises(ParameterError, match=r"^k=nan must be a finite number") as caught:
        apply_crdiff(loaded.pipe, RATIOS, k=float("nan"))
    assert "--" not in str(caught.value)
    with pytest.raises(ParameterError, match=r"^masks='lazy' is not a mask mode"):
        apply_crdiff(loaded.pipe, RATIOS, masks="lazy")
    with pytest.raises(ParameterError, match=r"^steps=0 must be at least 1"):
        GenerationSettings(Resolution(64, 64), steps=0)
    with pytest.raises(ParameterError, match=r"^ratios=3 is not a ratio source"):
        apply_crdiff(loaded.pipe, 3)
    with pytest.raises(ParameterError, match="has no UNet"):
        apply_crdiff(object(), RATIOS)
    assert attached_dual(loaded.unet) is None  # refused before anything changed


def test_a_saved_crdiff_pipeline_loads_as_its_dense_model_in_crdiff(load_tiny, tmp_path):
    """What crdiff applies is what the caller asks for, never a setting hidden in the folder."""
    from crdiff_cli import load_model

    loaded = load_tiny("tiny")
    dense = image(loaded.pipe)
    apply_crdiff(loaded.pipe, RATIOS, k=1.3)
    loaded.pipe.save_pretrained(tmp_path / "saved")
    again = load_model(str(tmp_path / "saved"))
    assert not isinstance(again.pipe.unet, DualUNet) and attached_dual(again.pipe.unet) is None
    assert np.array_equal(image(again.pipe), dense)


def test_a_refused_reapply_keeps_the_previous_settings(load_tiny):
    loaded = load_tiny("tiny")
    first = apply_crdiff(loaded.pipe, RATIOS, k=1.5)
    before = unet_output(loaded.pipe.unet)
    with pytest.raises(CrdiffError, match="ratio"):
        apply_crdiff(loaded.pipe, "0.3/0.3/1.5")
    assert loaded.pipe.unet is first and attached_dual(first.unet) is first
    assert torch.equal(unet_output(loaded.pipe.unet), before)


def test_a_write_through_data_is_noticed_by_set_spec(load_tiny):
    """PEFT fuses a LoRA with ``weight.data += delta``: no new tensor, no version bump; set_spec still re-masks."""
    loaded, oracle = load_tiny("tiny"), load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS, k=1.5, masks="copy")
    unet_output(dual)
    for unet in (dual.unet, oracle.unet):
        for _, weight in target_weights(unet)["mid"]:
            weight.data += 0.01 * torch.ones_like(weight)
    spec = PruneSpec.from_unet(oracle.unet, Ratios.parse(RATIOS))
    dual.set_spec(spec)
    assert torch.equal(unet_output(dual), unet_output(apply_crdiff(oracle.pipe, spec, k=1.5, masks="copy")))


def test_a_released_dual_unet_refuses_to_run(load_tiny):
    loaded = load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS)
    remove_crdiff(loaded.pipe)
    with pytest.raises(CrdiffError, match="was released"):
        unet_output(dual)


@pytest.mark.parametrize("masks", ["copy", "on-the-fly"])
def test_a_second_call_during_a_pruned_pass_is_refused_and_the_weights_come_back(load_tiny, masks):
    loaded = load_tiny("tiny")
    state = {name: t.clone() for name, t in loaded.unet.state_dict().items()}
    dual = apply_crdiff(loaded.pipe, RATIOS, k=1.0, masks=masks)
    name, _ = target_weights(dual.unet)["up"][0]
    layer = dual.unet.get_submodule(name.removesuffix(".weight"))
    handle = layer.register_forward_hook(lambda *_: unet_output(dual))  # re-enters the dual UNet mid-pass
    with pytest.raises(CrdiffError, match="one call at a time"):
        unet_output(dual)
    handle.remove()
    assert all(torch.equal(t, state[n]) for n, t in dual.unet.state_dict().items())
    assert all(isinstance(p, torch.nn.Parameter) for p in dual.unet.parameters())


def test_deep_copies_are_never_mistaken_for_the_attached_unet(load_tiny):
    import copy

    loaded = load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS)
    twin = copy.deepcopy(dual.unet)
    assert attached_dual(twin) is None and attached_dual(dual.unet) is dual
    with pytest.raises(CrdiffError, match="cannot be deep-copied"):
        copy.deepcopy(dual)


def test_applied_under_inference_mode_then_used_outside(load_tiny):
    loaded = load_tiny("tiny")
    with torch.inference_mode():
        dual = apply_crdiff(loaded.pipe, RATIOS, masks="copy")
    dual.set_spec(PruneSpec.from_unet(dual.unet, Ratios.parse("0.5/0.5/0.5")))
    unet_output(dual)


@pytest.mark.parametrize("masks", ["copy", "on-the-fly"])
def test_a_dtype_change_after_applying_is_refused(load_tiny, masks):
    loaded = load_tiny("tiny")
    dual = apply_crdiff(loaded.pipe, RATIOS, masks=masks)
    dual.unet.to(torch.float64)
    with pytest.raises(CrdiffError, match="apply CR-Diff again after changing the model's dtype"):
        dual(torch.zeros(1, 4, 8, 8, dtype=torch.float64), torch.tensor(500), torch.zeros(1, 77, 32, dtype=torch.float64))


def test_save_pretrained_passes_diffusers_options_on_and_refuses_push_to_hub(load_tiny, tmp_path):
    dual = apply_crdiff(load_tiny("tiny").pipe, RATIOS)
    dual.save_pretrained(tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "unet" / "crdiff.json").is_file()
    with pytest.raises(CrdiffError, match="push_to_hub"):
        dual.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_private_attributes_are_not_borrowed_from_the_inner_unet(load_tiny):
    """accelerate looks for ``_hf_hook`` on the module it offloads: one on the inner UNet is not the dual's."""
    dual = apply_crdiff(load_tiny("tiny").pipe, RATIOS)
    dual.unet._hf_hook = object()
    assert not hasattr(dual, "_hf_hook") and dual.config is dual.unet.config


def test_parameter_errors_survive_pickling():
    """Ranks send errors to each other pickled; the parameter and its wording must arrive whole."""
    import pickle

    sent = ParameterError("strength", 0.2, "with steps 4 denoises 0 times", mentions=("steps",))
    received = pickle.loads(pickle.dumps(sent))
    assert (received.param, received.value, received.mentions, str(received)) == \
        ("strength", 0.2, ("steps",), str(sent))
