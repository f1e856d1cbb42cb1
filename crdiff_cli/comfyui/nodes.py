"""CR-Diff's ComfyUI nodes: ``CR-Diff`` (ratios, a profile or Table 6, and k) and ``CR-Diff from artifact``.

Both take a ``MODEL`` and return a patched clone (the input model is not changed): a sampler wrapper that
takes the exact thresholds when sampling starts, and a diffusion-model wrapper that runs the dense and the
pruned pass and mixes them (:mod:`crdiff_cli.comfyui.patch`). The wrappers chain with other patches;
applying CR-Diff again replaces the previous CR-Diff patch. ComfyUI is imported only inside the node
functions, so this module imports without it (the node pack's ``__init__.py`` re-exports the mappings below).

Errors a user can fix (a ratio >= 1, a profile for another model family, a damaged artifact, a model that is
not a UNet) are raised as one-line ``ValueError``s, which ComfyUI shows as the node's error message.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from crdiff_cli import defaults
from crdiff_cli.comfyui.patch import CrdiffPatch, RatioSource
from crdiff_cli.dual.options import MASK_MODES
from crdiff_cli.errors import CrdiffError

KEY = "crdiff"  # the wrappers' key on a ModelPatcher
CATEGORY = "model_patches/crdiff"
AUTO = "Table 6 profile for the sampled size"
CUSTOM = "custom ratios (down / mid / up)"
_RATIO = {"default": 0.3, "min": 0.0, "max": 0.999, "step": 0.001}
_MASKS = (list(reversed(MASK_MODES)), {"default": "on-the-fly", "tooltip": "on-the-fly: no extra memory; copy: "
          "masked copies of the target weights, faster where steps are short"})
_LOG = logging.getLogger("crdiff")


class _ModelPatchNode:
    """What both nodes are to ComfyUI: MODEL in, patched MODEL out, in crdiff's category."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"


class CRDiff(_ModelPatchNode):
    """CR-Diff on a Stable Diffusion UNet: block-wise magnitude pruning plus POA, for non-native resolutions."""

    DESCRIPTION = ("Cross-resolution diffusion: each step runs the UNet dense and block-wise pruned and returns "
                   "e_dense + k (e_pruned - e_dense). Ratios: the paper's Table 6 profile for the model family at "
                   "the size being sampled, a built-in profile, custom down/mid/up ratios, or a crdiff profile "
                   "JSON (profile_file, e.g. from `crdiff search`). Thresholds are taken on the weights the model "
                   "samples with (LoRAs included). About 2x the sampling cost.")

    @classmethod
    def INPUT_TYPES(cls):
        from crdiff_cli.pruning.profile_table import builtin_profiles

        return {"required": {
            "model": ("MODEL",),
            "ratios_from": ([AUTO, CUSTOM, *(p.name for p in builtin_profiles())], {"default": AUTO}),
            "down": ("FLOAT", {**_RATIO, "tooltip": "share of the down blocks' target weights pruned (custom)"}),
            "mid": ("FLOAT", {**_RATIO, "tooltip": "share of the mid block's target weights pruned (custom)"}),
            "up": ("FLOAT", {**_RATIO, "tooltip": "share of the up blocks' target weights pruned (custom)"}),
            "k": ("FLOAT", {"default": defaults.K, "min": 0.0, "max": 10.0, "step": 0.05,
                            "tooltip": "POA: 0 dense, 1 pruned, >1 amplified (paper: 1.2-1.5)"}),
            "masks": _MASKS,
        }, "optional": {
            "profile_file": ("STRING", {"default": "", "tooltip": "a crdiff profile JSON; overrides ratios_from"}),
        }}

    def patch(self, model, ratios_from: str, down: float, mid: float, up: float, k: float, masks: str,
              profile_file: str = ""):
        return (_guarded(lambda: _patched(model, _ratio_source(model, ratios_from, (down, mid, up), profile_file),
                                          k, masks)),)


class CRDiffFromArtifact(_ModelPatchNode):
    """CR-Diff with the ratios, k and thresholds of a ``crdiff bake`` artifact or a profile."""

    DESCRIPTION = ("Apply what `crdiff bake` baked (.safetensors artifact: ratios, k and the exact thresholds, "
                   "checked against this model's weights) or what `crdiff search` found (profile JSON: ratios, and "
                   "k if it records one), so ComfyUI reproduces crdiff's images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "path": ("STRING", {"default": "", "tooltip": "a crdiff .safetensors artifact or a profile .json"}),
            "masks": _MASKS,
        }}

    def patch(self, model, path: str, masks: str):
        return (_guarded(lambda: _from_artifact(model, path, masks)),)


NODE_CLASS_MAPPINGS = {"CRDiff": CRDiff, "CRDiffFromArtifact": CRDiffFromArtifact}
NODE_DISPLAY_NAME_MAPPINGS = {"CRDiff": "CR-Diff (cross-resolution)", "CRDiffFromArtifact": "CR-Diff from artifact"}


def _guarded(make):
    """Run a node body; a :class:`CrdiffError` becomes one ``ValueError`` line, as ComfyUI shows node errors."""
    try:
        return make()
    except CrdiffError as exc:
        raise ValueError(f"CR-Diff: {exc}") from None


def model_family(model) -> str:
    """crdiff's family of a ComfyUI MODEL from ComfyUI's own model class (its SD1.5, SD2.x and SDXL classes and
    their variants, e.g. SSD-1B as SDXL); ``unknown`` for other UNets; refuses a model that is not a UNet."""
    from comfy import supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    inner = getattr(model, "model", None)
    unet = getattr(inner, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        kind = type(unet).__name__ if unet is not None else type(model).__name__
        raise CrdiffError(f"this model's diffusion model is a {kind}, not a Stable Diffusion UNet; CR-Diff prunes "
                          "the UNet of SD1.5, SD2.1 and SDXL models")
    config = inner.model_config
    if isinstance(config, (supported_models.SD_X4Upscaler, supported_models.LotusD)):  # SD2 subclasses, other tasks
        return "unknown"
    families = ((supported_models.SDXL, "sdxl"), (supported_models.SD20, "sd21"), (supported_models.SD15, "sd15"))
    return next((family for kind, family in families if isinstance(config, kind)), "unknown")


def _ratio_source(model, ratios_from: str, custom: tuple[float, float, float], profile_file: str) -> RatioSource:
    from crdiff_cli.pruning.profile_table import get_profile
    from crdiff_cli.pruning.ratios import Ratios

    family = model_family(model)
    if profile_file.strip():
        return RatioSource(profile=_profile_for(get_profile(profile_file.strip()), family))
    if ratios_from == CUSTOM:
        return RatioSource(ratios=Ratios(*custom))
    if ratios_from == AUTO:
        if family == "unknown":
            raise CrdiffError("Table 6 has profiles for SD1.5, SD2.1 and SDXL only; this UNet is none of them: "
                              "choose custom ratios or a profile file")
        return RatioSource()
    return RatioSource(profile=_profile_for(get_profile(ratios_from), family))


def _profile_for(profile, family: str):
    if profile.family != family and family != "unknown":
        raise CrdiffError(f"profile {profile.name} is for {profile.family} models, this model is {family}; choose a "
                          f"{family} profile")
    return profile


def _from_artifact(model, path: str, masks: str):
    """The artifact's (or profile's) ratios and k, checked against this model's family (and thresholds)."""
    from crdiff_cli.pruning.profile_table import get_profile

    file = Path(path.strip()).expanduser()
    if not path.strip() or not file.is_file():
        raise CrdiffError(f"no artifact or profile at {path!r}; give the path of a crdiff .safetensors artifact "
                          "or a profile .json")
    family = model_family(model)
    if file.suffix.lower() == ".json":
        profile = _profile_for(get_profile(str(file)), family)
        k = profile.extra.get("k")
        return _patched(model, RatioSource(profile=profile), defaults.K if k is None else k, masks)
    if file.suffix.lower() != ".safetensors":
        raise CrdiffError(f"{file.name}: ComfyUI takes a .safetensors artifact (an .onnx one runs in ONNX Runtime) "
                          "or a profile .json")
    from crdiff_cli.exporters.artifacts import read_metadata

    meta = read_metadata(file)
    if meta.family != family:
        raise CrdiffError(f"{file.name} was baked from a {meta.family} model, this model is {family}")
    source = RatioSource(ratios=meta.spec.ratios, expected=meta.spec.thresholds())
    return _patched(model, source, meta.k, masks)


def _patched(model, source: RatioSource, k: float, masks: str):
    """A clone of ``model`` carrying CR-Diff (any previous CR-Diff patch of it replaced)."""
    from comfy.patcher_extension import WrappersMP

    if not isinstance(k, (int, float)) or not math.isfinite(k):
        raise CrdiffError(f"k={k} must be a finite number >= 0")
    patch = CrdiffPatch(source, model_family(model), k, masks, warn=_LOG.warning)
    patched = model.clone()
    for wrapper_type in (WrappersMP.SAMPLER_SAMPLE, WrappersMP.DIFFUSION_MODEL):
        patched.remove_wrappers_with_key(wrapper_type, KEY)
    patched.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, KEY, patch.sampler_wrapper)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, patch.diffusion_model_wrapper)
    return patched


def patch_of(model) -> CrdiffPatch | None:
    """The CR-Diff patch a MODEL carries (its thresholds once sampling started), or None."""
    from comfy.patcher_extension import WrappersMP

    wrappers = model.get_wrappers(WrappersMP.DIFFUSION_MODEL, KEY)
    return wrappers[0].__self__ if wrappers else None
