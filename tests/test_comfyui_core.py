"""The ComfyUI nodes' pure-torch core, without ComfyUI: the target rule on LDM names, thresholds, masks, mixing,
and the one-step hook-up into a ComfyUI folder.

Oracles: diffusers' own LDM -> diffusers checkpoint conversion (our test's diffusers -> LDM names must round-trip
through it exactly), crdiff's PruneSpec on the same weights under diffusers' names, and ``torch.lerp``.
The same core running inside real ComfyUI is tested in test_comfyui.py (COMFYUI_DIR).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crdiff_cli.comfyui.install import MARKER
from crdiff_cli.comfyui.ldm_targets import ldm_group, ldm_target
from crdiff_cli.comfyui.patch import CrdiffPatch, RatioSource
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.spec import PruneSpec
from helpers import invoke

RATIOS = Ratios(0.3, 0.2, 0.25)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_names(config) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a UNet2DConditionModel config (the original SD layout)."""
    per = config.layers_per_block + 1
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "mid_block.attentions.0": "middle_block.1"}
    levels = len(config.block_out_channels)
    for i in range(levels):
        for j in range(config.layers_per_block):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{per * i + j + 1}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{per * i + j + 1}.1"
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{per * (i + 1)}.0.op"
        for j in range(per):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{per * i + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{per * i + j}.1"
        if i < levels - 1:
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{per * i + per - 1}.2.conv"
    for j in range(2):
        names[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    return names


def to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's state dict under LDM names (ComfyUI's, without the ``diffusion_model.`` prefix)."""
    names = ldm_names(unet.config)
    out = {}
    for key, tensor in unet.state_dict().items():
        prefix = max((p for p in names if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{_RESNET[head]}.{tail}"
        out[f"{names[prefix]}.{rest}"] = tensor
    return out


def ldm_module(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree under LDM names holding ``state``'s tensors: a module with a 2-D weight is a Linear, one
    with a 4-D weight a Conv2d (as in ComfyUI's UNet; a bias the state lacks is None), every other one a plain
    Module."""
    kinds = {key.rpartition(".")[0]: {2: nn.Linear, 4: nn.Conv2d}[t.ndim] for key, t in state.items()
             if key.endswith(".weight") and t.ndim in (2, 4)}
    root = nn.Module()
    for key, tensor in state.items():
        path, _, leaf = key.rpartition(".")
        parent, parts = root, path.split(".")
        for depth, part in enumerate(parts, start=1):
            if part not in parent._modules:
                kind = kinds.get(".".join(parts[:depth]))
                parent._modules[part] = kind(1, 1, 1) if kind is nn.Conv2d else kind(1, 1) if kind else nn.Module()
                parent._modules[part]._parameters.update(weight=None, bias=None)  # filled from ``state`` below
            parent = parent._modules[part]
        parent._parameters[leaf] = nn.Parameter(tensor.clone(), requires_grad=False)
    return root


@pytest.fixture(params=["tiny", "tiny-sdxl"])
def unets(request, load_tiny):
    """``(diffusers UNet, the same weights as an LDM-named module)``."""
    unet = load_tiny(request.param).unet
    return unet, ldm_module(to_ldm(unet))


def test_the_ldm_names_round_trip_through_diffusers_own_conversion(unets):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, _ = unets
    checkpoint = {"model.diffusion_model." + k: v for k, v in to_ldm(unet).items()}
    back = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())


def test_ldm_groups_follow_crdiffs_rule():
    assert ldm_group("input_blocks.1.1.transformer_blocks.0.attn1.to_q") == "down"
    assert ldm_group("diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2") == "mid"
    assert ldm_group("output_blocks.5.1.transformer_blocks.1.attn1.to_out.0") == "up"
    for name in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.0.0", "time_embed.0",
                 "label_emb.0.0", "out.2", "input_blocks.1.0.in_layers.2", "output_blocks.2.1.proj_in"):
        assert ldm_group(name) is None, name


def test_thresholds_on_ldm_names_equal_crdiffs_on_diffusers_names(unets):
    unet, ldm = unets
    expected = PruneSpec.from_unet(unet, RATIOS)
    got = PruneSpec.from_unet(ldm, RATIOS, target_filter=ldm_target)
    assert got.thresholds() == expected.thresholds() and all(t is not None for t in got.thresholds().values())
    assert got.groups == expected.groups  # layers, targets and pruned counts too


def targets_of(ldm: nn.Module, spec) -> list[tuple[str, nn.Linear, float | None]]:
    """Every target layer of ``ldm`` with its group's threshold."""
    from crdiff_cli.pruning.targets import target_modules

    thresholds = spec.thresholds()
    return [(g, m, thresholds[g]) for g, ms in target_modules(ldm, ldm_target).items() for _, m in ms]


@pytest.mark.parametrize("masks", ["on-the-fly", "copy"])
def test_the_pruned_pass_runs_exactly_the_specs_pruned_weights(unets, masks):
    _, ldm = unets
    patch = CrdiffPatch(RatioSource(ratios=RATIOS), "sd15", 1.5, masks)
    spec = patch.prepare(ldm, (1, 4, 8, 8))
    zeroed = {g: 0 for g in spec.groups}
    for group, layer, threshold in targets_of(ldm, spec):
        x = torch.randn(2, layer.weight.shape[1], generator=torch.Generator().manual_seed(1))
        own = layer.weight
        masked = torch.where(own.abs() > threshold, own, 0.0)
        with torch.no_grad():
            with patch.pruned_pass():
                pruned = layer(x)
            assert torch.equal(pruned, nn.functional.linear(x, masked, layer.bias))
            assert torch.equal(layer(x), nn.functional.linear(x, own, layer.bias))  # outside: its own weight
        assert layer.weight is own and not layer._forward_hooks and not layer._forward_pre_hooks
        zeroed[group] += int((masked == 0).sum() - (own == 0).sum())
    assert zeroed == {g: s.pruned for g, s in spec.groups.items()}


@pytest.mark.parametrize("k", [0.0, 1.0, 1.5, 0.3])
@pytest.mark.parametrize("skip", [True, False])
def test_one_model_call_is_lerp_of_the_two_passes_with_fresh_control_lists(unets, k, skip):
    _, ldm = unets
    patch = CrdiffPatch(RatioSource(ratios=RATIOS), "sd15", k)
    patch.skip_single_branch = skip
    spec = patch.prepare(ldm, (1, 4, 8, 8))
    _, layer, threshold = targets_of(ldm, spec)[0]
    x = torch.randn(3, layer.weight.shape[1], generator=torch.Generator().manual_seed(0))
    control = {"output": [torch.ones(1), torch.ones(1)]}
    passes = []

    def executor(x, timesteps, context, y, control, transformer_options):  # a UNet pass, as ComfyUI runs it
        passes.append(len(control["output"]))
        control["output"].pop()
        return layer(x)

    with torch.no_grad():
        out = patch.diffusion_model_wrapper(executor, x, None, None, None, control, {})
        dense = nn.functional.linear(x, layer.weight, layer.bias)
        pruned = nn.functional.linear(x, torch.where(layer.weight.abs() > threshold, layer.weight, 0.0), layer.bias)
    assert torch.equal(out, torch.lerp(dense, pruned, k))
    assert len(control["output"]) == 2 and passes == [2] * len(passes)  # each pass got the whole, fresh list
    assert len(passes) == (1 if skip and k in (0, 1) else 2)


def test_an_artifacts_thresholds_must_match_the_models_weights(unets):
    _, ldm = unets
    wrong = {g: (t or 0.0) * 2 for g, t in PruneSpec.from_unet(ldm, RATIOS, target_filter=ldm_target).thresholds().items()}
    patch = CrdiffPatch(RatioSource(ratios=RATIOS, expected=wrong), "sd15", 1.5)
    with pytest.raises(CrdiffError, match="baked from another model"):
        patch.prepare(ldm, (1, 4, 8, 8))


def test_table6_is_chosen_for_the_sampled_size(unets):
    _, ldm = unets
    warnings = []
    patch = CrdiffPatch(RatioSource(), "sd15", 1.5, warn=warnings.append)
    spec = patch.prepare(ldm, (1, 4, 50, 70))  # 400x560: an exact Table 6 entry
    from crdiff_cli.pruning.profile_table import get_profile

    assert spec.ratios == get_profile("sd15@400x560").ratios and warnings == []
    patch.prepare(ldm, (1, 4, 9, 9))  # 72x72: the nearest profile, with a warning
    assert len(warnings) == 1


def test_comfyui_install_writes_one_stub_and_only_replaces_its_own(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    result = invoke("comfyui", comfy)
    assert result.exit_code == 0, result.output
    init = comfy / "custom_nodes" / "crdiff" / "__init__.py"
    assert init.read_text().startswith(MARKER)
    namespace: dict = {}
    exec(compile(init.read_text(), str(init), "exec"), namespace)  # what ComfyUI does with the pack
    assert set(namespace["NODE_CLASS_MAPPINGS"]) == {"CRDiff", "CRDiffFromArtifact"}
    again = invoke("comfyui", comfy)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert invoke("comfyui", comfy, "--overwrite").exit_code == 0
    init.write_text("# someone else's pack\n")
    foreign = invoke("comfyui", comfy, "--overwrite")
    assert foreign.exit_code == 2 and "did not create" in foreign.stderr and init.read_text() == "# someone else's pack\n"
    not_comfy = invoke("comfyui", tmp_path / "elsewhere")
    assert not_comfy.exit_code == 2 and "is not a folder" in not_comfy.stderr
