"""The pruning engine (PruneStats / PruneSpec / prune_) against a plain-torch restatement of the pruning rule (docs/method.md).

The reference below is written from the definition alone and shares no code with crdiff_cli: its own
target selection from ``named_modules``, ``torch.cat`` + ``kthvalue`` per group, ``|w| <= t`` pruned.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.spec import GroupSpec, PruneSpec, PruneStats, check_matches, prune_, pruned_weight
from crdiff_cli.pruning.targets import group_of, target_modules, target_weights

PREFIXES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


# --- the reference implementation ------------------------------------------------------------------

def reference_targets(unet: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The rule: Linear/Conv2d, name starts with down_blocks/mid_block/up_blocks, contains attn or ff,
    does not contain attn2. Returns ``{group: [(param_name, weight), ...]}``."""
    groups = {"down": [], "mid": [], "up": []}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        if prefix and ("attn" in name or "ff" in name) and "attn2" not in name:
            groups[PREFIXES[prefix]].append((name + ".weight", module.weight))
    return groups


def reference_prune(unet: nn.Module, ratios: tuple[float, float, float]) -> dict:
    """Prune ``unet`` in place by the definition; returns per group (n, m, t or None, pruned count)."""
    out = {}
    with torch.no_grad():
        for (group, weights), r in zip(reference_targets(unet).items(), ratios):
            n = sum(w.numel() for _, w in weights)
            m = math.floor(n * r)
            if m == 0:
                out[group] = (n, m, None, 0)
                continue
            t = torch.cat([w.detach().abs().flatten() for _, w in weights]).kthvalue(m).values
            pruned = 0
            for _, w in weights:
                mask = w.abs() <= t
                pruned += int(mask.sum())
                w[mask] = 0
            out[group] = (n, m, t.item(), pruned)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so +0.0 != -0.0 and NaN payloads count)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(sd_a: dict, sd_b: dict, names=None):
    names = sd_a.keys() if names is None else names
    assert set(sd_a) == set(sd_b)
    for name in names:
        a, b = sd_a[name], sd_b[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(bits(a), bits(b)), f"{name} differs"


def tie_group(unet: nn.Module, group: str, levels: float = 16.0):
    """Round one group's target weights to a handful of magnitudes (both signs, many zeros)."""
    with torch.no_grad():
        for _, w in reference_targets(unet)[group]:
            w.copy_(torch.round(w * levels) / levels)


# --- engine vs reference ----------------------------------------------------------------------------

RATIO_SETS = [
    (0.0, 0.0, 0.0),
    (0.433, 0.345, 0.300),      # Table 6, sd15@512x512
    (0.482, 0.396, 0.469),      # Table 6, sdxl@400x560
    (0.5, 0.999, 0.05),
    (1e-6, 0.3, 2e-6),          # n * r < 1 for down and up: m = 0, groups untouched
    (0.9999, 0.0, 0.1),
]


def engine_prune(unet, ratios):
    spec = PruneStats(unet).spec(Ratios(*ratios))
    prune_(unet, spec)
    return spec


def compare(load_tiny, name, ratios, dtype="fp32", ties=None):
    dense = load_tiny(name, dtype)
    ours, ref = load_tiny(name, dtype), load_tiny(name, dtype)
    if ties:
        for model in (dense, ours, ref):
            tie_group(model.unet, ties)
    spec = engine_prune(ours.unet, ratios)
    expected = reference_prune(ref.unet, ratios)

    sd_ours, sd_ref, sd_dense = ours.unet.state_dict(), ref.unet.state_dict(), dense.unet.state_dict()
    assert_bit_identical(sd_ours, sd_ref)  # every parameter and buffer, pruned or not

    target_names = {p for ws in reference_targets(dense.unet).values() for p, _ in ws}
    others = [k for k in sd_dense if k not in target_names]
    assert any(k.endswith(".bias") for k in others)
    assert_bit_identical(sd_ours, sd_dense, others)  # biases and every non-target parameter untouched

    for group, (n, m, t, pruned) in expected.items():
        g = spec.groups[group]
        assert (g.targets, g.ratio) == (n, ratios[("down", "mid", "up").index(group)])
        assert g.threshold == t  # None exactly when m == 0
        assert g.pruned == pruned
        assert g.layers == len(reference_targets(dense.unet)[group])
        zeros_now = sum(int((sd_ours[p] == 0).sum()) for p, _ in reference_targets(dense.unet)[group])
        zeros_before = sum(int((sd_dense[p] == 0).sum()) for p, _ in reference_targets(dense.unet)[group])
        assert zeros_now == (zeros_before if t is None else pruned)
        if t is None:
            assert_bit_identical(sd_ours, sd_dense, [p for p, _ in reference_targets(dense.unet)[group]])
        else:
            assert pruned >= m
    return spec, expected


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("ratios", RATIO_SETS, ids=lambda r: "/".join(map(str, r)))
def test_engine_matches_reference(load_tiny, name, ratios):
    spec, expected = compare(load_tiny, name, ratios)
    if ratios == (0.0, 0.0, 0.0):
        assert spec.thresholds() == {"down": None, "mid": None, "up": None}
    if ratios[0] == 1e-6:
        assert expected["down"][1] == 0 and expected["up"][1] == 0 and expected["mid"][1] > 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_engine_matches_reference_in_half_precision(load_tiny, dtype):
    """t is taken on the stored values, in the model's dtype."""
    spec, _ = compare(load_tiny, "tiny", (0.433, 0.345, 0.300), dtype=dtype)
    assert spec.dtype == {"fp16": "float16", "bf16": "bfloat16"}[dtype]


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.9])
def test_tied_magnitudes_prune_all_ties(load_tiny, name, ratio):
    spec, expected = compare(load_tiny, name, (0.2, ratio, 0.2), ties="mid")
    n, m, t, pruned = expected["mid"]
    assert pruned > m, "the tie run at t must make the pruned count exceed m"
    assert spec.groups["mid"].pruned == pruned


def test_tied_group_that_is_mostly_zero(load_tiny):
    """Coarse rounding makes most of a group exactly 0: t = 0 and every zero counts as pruned."""
    ours, ref = load_tiny("tiny"), load_tiny("tiny")
    for model in (ours, ref):
        tie_group(model.unet, "mid", levels=2.0)
    targets = reference_targets(ref.unet)["mid"]
    zeros = sum(int((w == 0).sum()) for _, w in targets)
    assert zeros > 0.5 * sum(w.numel() for _, w in targets)
    spec = engine_prune(ours.unet, (0.1, 0.3, 0.2))
    expected = reference_prune(ref.unet, (0.1, 0.3, 0.2))
    assert spec.groups["mid"].threshold == 0.0 == expected["mid"][2]
    assert spec.groups["mid"].pruned == expected["mid"][3] == zeros > expected["mid"][1]
    assert_bit_identical(ours.unet.state_dict(), ref.unet.state_dict())


def test_stats_reuse_gives_same_spec_as_fresh(tiny_readonly):
    unet = tiny_readonly["tiny"].unet
    stats = PruneStats(unet)
    sets = [Ratios(0.1, 0.2, 0.3), Ratios(0.5, 0.0, 0.9), Ratios(0.1, 0.2, 0.3)]  # the last one is memoised
    for r in sets:
        assert stats.spec(r) == PruneStats(unet).spec(r) == PruneSpec.from_unet(unet, r)


def test_pruned_weight_is_a_masked_copy(tiny_readonly):
    unet = tiny_readonly["tiny"].unet
    spec = PruneSpec.from_unet(unet, Ratios(0.3, 0.3, 0.3))
    t = spec.groups["down"].threshold
    _, w = target_weights(unet)["down"][0]
    before = w.detach().clone()
    out = pruned_weight(w, t)
    assert torch.equal(w, before)  # the dense weight is not touched
    assert torch.equal(out, torch.where(w.abs() <= t, torch.zeros_like(w), w))
    untouched = pruned_weight(w, None)
    assert torch.equal(untouched, w) and untouched.data_ptr() != w.data_ptr()


# --- PruneSpec serialisation and shape checks -------------------------------------------------------

def test_prune_spec_round_trip(tiny_readonly):
    spec = PruneSpec.from_unet(tiny_readonly["tiny-sdxl"].unet, Ratios(0.482, 0.396, 1e-6))
    data = json.loads(json.dumps(spec.to_dict()))
    assert set(data) == {"ratios", "dtype", "groups"}
    assert set(data["groups"]["mid"]) == {"ratio", "layers", "targets", "threshold", "pruned"}
    assert data["groups"]["up"]["threshold"] is None
    again = PruneSpec.from_dict(data)
    assert again == spec
    assert again.thresholds() == spec.thresholds()
    assert isinstance(again.groups["down"], GroupSpec) and again.ratios == Ratios(0.482, 0.396, 1e-6)


def test_applying_a_deserialised_spec_gives_the_same_weights(load_tiny):
    a, b = load_tiny("tiny"), load_tiny("tiny")
    spec = PruneSpec.from_unet(a.unet, Ratios(0.3, 0.4, 0.5))
    prune_(a.unet, spec)
    prune_(b.unet, PruneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    assert_bit_identical(a.unet.state_dict(), b.unet.state_dict())


def test_prune_is_idempotent(load_tiny):
    a = load_tiny("tiny")
    spec = PruneSpec.from_unet(a.unet, Ratios(0.3, 0.4, 0.5))
    prune_(a.unet, spec)
    once = {k: v.clone() for k, v in a.unet.state_dict().items()}
    assert prune_(a.unet, spec) is a.unet
    assert_bit_identical(once, a.unet.state_dict())


def other_shaped_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2)


def test_check_matches_rejects_another_shape(tiny_readonly):
    spec = PruneSpec.from_unet(tiny_readonly["tiny"].unet, Ratios(0.3, 0.3, 0.3))
    other = other_shaped_unet()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CrdiffError) as info:
        prune_(other, spec)
    message = str(info.value)
    assert "\n" not in message and "recompute" in message and "target weights" in message
    assert_bit_identical(before, other.state_dict())  # refused before touching anything
    with pytest.raises(CrdiffError):
        check_matches(other, spec)
    assert check_matches(tiny_readonly["tiny"].unet, spec).keys() == {"down", "mid", "up"}


# --- the target rule --------------------------------------------------------------------------------

SUFFIXES = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_target_rule_on_tiny_models(tiny_readonly, name):
    unet = tiny_readonly[name].unet
    ours = {g: [n for n, _ in ws] for g, ws in target_weights(unet).items()}
    ref = {g: [n for n, _ in ws] for g, ws in reference_targets(unet).items()}
    assert ours == ref
    for group, names in ours.items():
        assert names, f"{group} group has no targets"
        blocks = {n.rsplit(".transformer_blocks.", 1)[0] + n.split(".transformer_blocks.", 1)[1].split(".", 1)[0]
                  for n in names}
        assert len(names) == 6 * len(blocks)  # six targets per transformer block
        for n in names:
            assert n.endswith(".weight")
            assert any(n.endswith(s + ".weight") for s in SUFFIXES), n
            for banned in ("attn2", "resnets", "proj_in", "proj_out", "conv_in", "conv_out", "time_emb", "norm"):
                assert banned not in n, n
    all_targets = {n for names in ours.values() for n in names}
    for param_name, _ in unet.named_parameters():
        if any(s in param_name for s in ("attn2.", "resnets.", "proj_in", "proj_out", "add_embedding", "time_embedding")):
            assert param_name not in all_targets


def test_group_of():
    assert group_of("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == "down"
    assert group_of("mid_block.attentions.0.transformer_blocks.0.ff.net.2") == "mid"
    assert group_of("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == "up"
    assert group_of("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k") is None
    assert group_of("down_blocks.0.resnets.0.conv1") is None
    assert group_of("down_blocks.0.attentions.0.proj_in") is None  # "attentions" does not contain "attn"
    assert group_of("conv_in") is None
    assert group_of("time_embedding.linear_1") is None


def meta_unet(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real architecture without allocating its weights
        return UNet2DConditionModel(**config)


def test_sd15_architecture_target_sizes():
    """SD1.5's sizes (docs/method.md): down 68.8M in 36 layers, mid 26.2M in 6, up 103.2M in 54; 859.5M params in all."""
    unet = meta_unet(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    sizes = {g: (len(ws), sum(p.numel() for _, p in ws)) for g, ws in target_weights(unet).items()}
    assert sizes == {"down": (36, 68_812_800), "mid": (6, 26_214_400), "up": (54, 103_219_200)}
    assert {g: [n for n, _ in ws] for g, ws in target_weights(unet).items()} == \
        {g: [n for n, _ in ws] for g, ws in reference_targets(unet).items()}
    assert all(isinstance(m, nn.Linear) for mods in target_modules(unet).values() for _, m in mods)
