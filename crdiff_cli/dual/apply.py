"""Applying CR-Diff to a diffusers pipeline (or a UNet) in one call, and removing it.

``apply_crdiff(pipe, "sd15@400x560", k=1.2)`` puts a :class:`~crdiff_cli.dual.unet.DualUNet` in place of
``pipe.unet``; ``remove_crdiff(pipe)`` puts the plain UNet back, which then computes exactly as before
(its weights are never changed). Applying again replaces the previous dual UNet: the call states the
whole configuration, as ``pipe.enable_freeu(...)`` does, so it never stacks two of them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from torch import nn

from crdiff_cli import defaults
from crdiff_cli.dual.options import check_k, check_masks
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.dual.unet import DualUNet, attached_dual
from crdiff_cli.errors import ParameterError
from crdiff_cli.pruning.family import detect_family
from crdiff_cli.pruning.profile_table import Profile, RatioChoice, choose_ratios
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec
from crdiff_cli.pruning.targets import TargetFilter

RATIO_TEXT = re.compile(r"^\s*[0-9.eE+-]+\s*/\s*[0-9.eE+-]+\s*/\s*[0-9.eE+-]+\s*$")  # "D/M/U", not a path


def apply_crdiff(pipe_or_unet, ratios: PruneSpec | Ratios | Profile | str | None = None, *, k: float = defaults.K,
                 masks: str = defaults.MASKS, resolution: Resolution | str | None = None,
                 target_filter: TargetFilter | None = None, poa: PoaPolicy | None = None) -> DualUNet:
    """Apply CR-Diff: the UNet's pruned twin, combined with it by POA, ``e = e_d + k (e_p - e_d)``.

    ``pipe_or_unet``: a diffusers pipeline (its ``unet`` is replaced) or a UNet (use the returned module).
    ``ratios``: a :class:`PruneSpec`, :class:`Ratios`, a :class:`Profile`, a built-in profile name
    (``"sd15@400x560"``), a profile JSON path, or ``"D/M/U"``; None with ``resolution`` picks the paper's
    profile for the model's family nearest to that HEIGHTxWIDTH (a warning says when it is not exact).
    ``k``: 0 dense, 1 pruned, > 1 amplified (default 1.5). ``masks``: ``"copy"`` (fast, +23% of an SD1.5
    UNet) or ``"on-the-fly"`` (no extra memory). ``target_filter(name, module) -> group or None`` chooses
    the target layers for UNets laid out differently (default: crdiff's rule). ``poa``: a
    :class:`~crdiff_cli.dual.poa_policy.PoaPolicy` running both passes on part of the steps only (default:
    every step); it reads the steps from the pipeline's scheduler, so pass the pipeline, not its UNet.

    The thresholds are taken on the weights as they are now: apply after fusing a LoRA. Returns the
    :class:`DualUNet` (``.k`` can be changed between calls; ``.set_spec`` switches ratios).
    """
    check_k(k)
    check_masks(masks)
    pipe_or_unet = getattr(pipe_or_unet, "pipe", pipe_or_unet)  # crdiff's LoadedModel: its pipeline
    unet = _unet_of(pipe_or_unet)
    previous = attached_dual(unet)
    if previous is not None:
        unet = previous.unet
    spec = ratios if isinstance(ratios, PruneSpec) else prune_spec_for(unet, ratios, resolution=resolution,
                                                                      target_filter=target_filter)
    if previous is not None:  # only now: a refused new setting leaves the previous one in place
        previous.release()
    dual = DualUNet(unet, spec, k=k, masks=masks, poa=poa)
    if _is_pipeline(pipe_or_unet):
        pipe_or_unet.unet = dual
        dual.poa.bind(pipe_or_unet)
    return dual


def remove_crdiff(pipe_or_unet) -> nn.Module:
    """Remove CR-Diff: the plain UNet back in the pipeline (and returned); nothing happens without CR-Diff."""
    pipe_or_unet = getattr(pipe_or_unet, "pipe", pipe_or_unet)
    unet = _unet_of(pipe_or_unet)
    dual = attached_dual(unet)
    if dual is None:
        return unet
    plain = dual.release()
    if _is_pipeline(pipe_or_unet):
        pipe_or_unet.unet = plain
    return plain


def prune_spec_for(unet: nn.Module, ratios: Ratios | Profile | str | None = None, *,
                   resolution: Resolution | str | None = None, target_filter: TargetFilter | None = None) -> PruneSpec:
    """The exact thresholds on ``unet`` of any ratio source :func:`apply_crdiff` accepts (a spec aside)."""
    choice = ratio_choice(unet, ratios, resolution=resolution)
    if choice.warning:
        warnings.warn(choice.warning, stacklevel=3)
    return PruneSpec.from_unet(unet, choice.ratios, target_filter=target_filter)


def ratio_choice(unet: nn.Module, ratios: Ratios | Profile | str | None, *,
                 resolution: Resolution | str | None = None) -> RatioChoice:
    """Which ratios a source names, where they came from, and a warning (another family or resolution)."""
    if isinstance(resolution, str):
        resolution = Resolution.parse(resolution)
    if isinstance(ratios, Ratios):
        return RatioChoice(ratios, f"ratios {ratios}")
    if isinstance(ratios, Profile):
        return RatioChoice(ratios.ratios, f"profile {ratios.name}", None, ratios)
    if ratios is not None and not isinstance(ratios, (str, Path)):
        raise ParameterError("ratios", repr(ratios), "is not a ratio source; pass a PruneSpec, Ratios, Profile, a "
                             "profile name or file, or 'D/M/U'")
    text = None if ratios is None else str(ratios)
    is_ratio_text = text is not None and RATIO_TEXT.match(text) is not None and not Path(text).exists()
    return choose_ratios(detect_family(unet.config), ratios=text if is_ratio_text else None,
                         profile=None if is_ratio_text else text, resolution=resolution)


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module) and hasattr(obj, "unet")


def _unet_of(pipe_or_unet) -> nn.Module:
    if isinstance(pipe_or_unet, nn.Module):
        return pipe_or_unet
    unet = getattr(pipe_or_unet, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ParameterError("pipe_or_unet", type(pipe_or_unet).__name__, "has no UNet; pass a diffusers Stable "
                             "Diffusion pipeline (pipe.unet) or a UNet2DConditionModel")
    return unet
