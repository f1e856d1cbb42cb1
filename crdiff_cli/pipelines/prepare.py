"""The one preparation path every command takes: load the model, fuse LoRAs, pick the conditioning pipeline,
then choose the ratios and take their exact thresholds on the weights the model really uses.

The order matters and is kept in one place: a LoRA is fused before any threshold is taken (crdiff prunes the
fused weights), and the ratios are chosen after loading because a profile is picked by the model's family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from crdiff_cli.pruning.profile_table import RatioChoice, choose_ratios
from crdiff_cli.pruning.resolution import Resolution

if TYPE_CHECKING:
    from crdiff_cli.pipelines.conditioning import ImageInputs
    from crdiff_cli.pipelines.loading import LoadedModel
    from crdiff_cli.pipelines.lora import LoraFile
    from crdiff_cli.pruning.spec import PruneSpec


def load_prepared(model: str, *, dtype: str = "fp32", device: str = "cpu", loras: "tuple[LoraFile, ...] | list" = (),
                  inputs: "ImageInputs | None" = None) -> "LoadedModel":
    """``model`` loaded, its LoRAs fused, and wrapped in the ControlNet / img2img / inpainting pipeline
    ``inputs`` asks for (the text-to-image pipeline without)."""
    from crdiff_cli.pipelines import loading
    from crdiff_cli.pipelines.lora import fuse_loras

    loaded = loading.load_model(model, dtype=dtype, device=device)
    fuse_loras(loaded.pipe, list(loras))
    if inputs is not None:
        loaded.pipe = inputs.pipeline(loaded.pipe)
    return loaded


def choose_spec(loaded: "LoadedModel", *, ratios: str | None, profile: str | None, resolution: Resolution | None,
                warn: Callable[[str], None] | None = None) -> "tuple[RatioChoice, PruneSpec]":
    """The ratios to use (explicit, a profile, or the family's profile nearest to ``resolution``) and
    their exact thresholds on ``loaded``'s UNet; ``warn`` hears why a choice may not fit."""
    from crdiff_cli.pruning.spec import PruneSpec

    choice = choose_ratios(loaded.family, ratios=ratios, profile=profile, resolution=resolution)
    if choice.warning and warn is not None:
        warn(choice.warning)
    return choice, PruneSpec.from_unet(loaded.unet, choice.ratios)
