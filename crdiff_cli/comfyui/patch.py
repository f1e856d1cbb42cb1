"""The pure-torch core of CR-Diff in ComfyUI: thresholds, the pruned pass, and the POA call.

ComfyUI samples with a ``ModelPatcher`` whose weights are the model's plus any patches applied upstream (LoRAs),
written into the module when it is loaded for sampling. So the thresholds are taken when sampling starts
(:meth:`CrdiffPatch.prepare`, called from a sampler wrapper), on the weights the UNet then holds, with
crdiff's own engine (:class:`~crdiff_cli.pruning.spec.PruneSpec` and its target filter
:func:`~crdiff_cli.comfyui.ldm_targets.ldm_target`): the same thresholds ``crdiff prune`` takes on the same
weights under diffusers' names.

Each model call then runs the UNet twice (:meth:`CrdiffPatch.diffusion_model_wrapper`): dense, then pruned,
mixed with ``torch.lerp(e_d, e_p, k)``. During the pruned pass only (:meth:`CrdiffPatch.pruned_pass`) each
target layer computes with its pruned weight, put in place of its ``weight`` and taken out right after, as
crdiff's own dual UNet does: made right before the layer runs (``masks="on-the-fly"``, no extra memory) or a
masked copy made when sampling starts (``"copy"``, +the targets' size, faster). The dense pass is the plain
model's own code path. (ComfyUI's per-weight functions would do the masking too, but a layer with one copies its
weight on every call, dense pass included: measured 4.2-4.7x a plain step on SD1.5 at 64x64 instead of ~2x.)
Both passes get their own copy of the ControlNet residual lists, which the UNet consumes.

Nothing here imports ComfyUI: :mod:`crdiff_cli.comfyui.nodes` registers the wrappers with it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from crdiff_cli.comfyui.ldm_targets import ldm_target
from crdiff_cli.dual.options import check_k, check_masks
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.profile_table import Profile, choose_ratios
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import PruneSpec, pruned_weight
from crdiff_cli.pruning.targets import target_modules

LATENT_SCALE = 8  # pixels per latent cell in SD1.5, SD2.1 and SDXL


@dataclass(frozen=True)
class RatioSource:
    """Where the ratios come from: given (``ratios``), a profile, or the family's Table 6 profile nearest to the
    size being sampled (both None). ``expected`` are thresholds the weights must give (an artifact's)."""

    ratios: Ratios | None = None
    profile: Profile | None = None
    expected: dict[str, float | None] | None = None

    def choose(self, family: str, resolution: Resolution) -> tuple[Ratios, str | None]:
        """The ratios for sampling ``resolution``, and a warning when a Table 6 profile is not exact."""
        if self.ratios is not None:
            return self.ratios, None
        if self.profile is not None:
            return self.profile.ratios, None
        choice = choose_ratios(family, ratios=None, profile=None, resolution=resolution)
        return choice.ratios, choice.warning


class CrdiffPatch:
    """CR-Diff for one ComfyUI model: the ratio source, k, the mask mode, and the thresholds taken at sampling.

    ``skip_single_branch`` lets ``k = 0`` and ``k = 1`` run only the branch ``lerp`` returns (the result is the
    same; tests turn it off to check that).
    """

    def __init__(self, source: RatioSource, family: str, k: float, masks: str = "on-the-fly",
                 warn: Callable[[str], None] | None = None):
        check_k(k)
        self.source, self.family, self.k, self.masks = source, family, float(k), check_masks(masks)
        self.warn = warn or (lambda message: None)
        self.spec: PruneSpec | None = None
        self.skip_single_branch = True
        self._targets: list[tuple[nn.Module, float]] = []  # (layer, threshold) of every pruned target
        self._copies: list[torch.Tensor] = []  # copy mode: each target's masked weight, in ``_targets`` order
        self._dense: dict[int, nn.Parameter] = {}  # on the fly: a layer's own weight while its pruned one runs

    def prepare(self, diffusion_model: nn.Module, latent_shape: tuple[int, ...]) -> PruneSpec:
        """Take the thresholds on the UNet's weights as they are now (LoRAs applied); make masked copies in copy
        mode. ``latent_shape`` (``[batch, channels, h, w]``) gives the resolution a Table 6 profile is chosen for."""
        _refuse_unpatched(diffusion_model)
        resolution = Resolution(latent_shape[-2] * LATENT_SCALE, latent_shape[-1] * LATENT_SCALE)
        ratios, warning = self.source.choose(self.family, resolution)
        if warning:
            self.warn(warning)
        spec = PruneSpec.from_unet(diffusion_model, ratios, target_filter=ldm_target)
        if self.source.expected is not None and spec.thresholds() != self.source.expected:
            raise CrdiffError(f"this model's weights give other thresholds ({spec.thresholds()}) than the artifact "
                              f"records ({self.source.expected}): it was baked from another model (or with other "
                              "LoRAs); load the model it was baked from")
        thresholds = spec.thresholds()
        self._targets = [(module, thresholds[g]) for g, modules in target_modules(diffusion_model, ldm_target).items()
                         for _, module in modules if thresholds[g] is not None]
        with torch.no_grad():
            self._copies = [pruned_weight(m.weight, t) for m, t in self._targets] if self.masks == "copy" else []
        self.spec = spec
        return spec

    @contextmanager
    def pruned_pass(self):
        """Inside, every target layer computes with its pruned weight; outside, with its own, untouched."""
        if self._copies:
            dense = [module._parameters["weight"] for module, _ in self._targets]
            for (module, _), copy in zip(self._targets, self._copies):
                module._parameters["weight"] = copy
            try:
                yield
            finally:
                for (module, _), weight in zip(self._targets, dense):
                    module._parameters["weight"] = weight
            return
        hooks = []
        try:
            for module, threshold in self._targets:
                hooks.append(module.register_forward_pre_hook(partial(self._swap_in, threshold=threshold)))
                hooks.append(module.register_forward_hook(self._swap_out))
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _swap_in(self, module: nn.Module, _inputs, threshold: float) -> None:
        """On the fly: right before a target layer runs in the pruned pass, its pruned weight in place of its own."""
        self._dense[id(module)] = module._parameters["weight"]
        module._parameters["weight"] = pruned_weight(self._dense[id(module)].detach(), threshold)

    def _swap_out(self, module: nn.Module, _inputs, _output) -> None:
        module._parameters["weight"] = self._dense.pop(id(module))

    def sampler_wrapper(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        """ComfyUI's ``SAMPLER_SAMPLE`` wrapper: the model is loaded (patches applied); take the thresholds."""
        self.prepare(guider.model_patcher.model.diffusion_model, tuple(noise.shape))
        return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)

    def diffusion_model_wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        """ComfyUI's ``DIFFUSION_MODEL`` wrapper: ``lerp(e_dense, e_pruned, k)`` over two UNet passes."""
        if self.spec is None:
            raise CrdiffError("CR-Diff's thresholds were not taken: the model was called outside a sampler")

        def dense():
            return executor(x, timesteps, context, y, _fresh(control), dict(transformer_options), **kwargs)

        def pruned():
            with self.pruned_pass():
                return dense()

        if self.skip_single_branch and (self.k == 0 or not self._targets):
            return dense()
        if self.skip_single_branch and self.k == 1:
            return pruned()
        return torch.lerp(dense(), pruned(), self.k)


def _fresh(control):
    """A copy of ControlNet residuals for one UNet pass (the UNet pops the lists it is given)."""
    return {name: list(value) for name, value in control.items()} if isinstance(control, dict) else control


def _refuse_unpatched(diffusion_model: nn.Module) -> None:
    """Refuse a partially loaded model (ComfyUI's low-VRAM mode), whose weights are patched per use, not stored:
    thresholds taken on them would miss the LoRAs."""
    for name, module in diffusion_model.named_modules():
        if any(type(f).__name__ == "LowVramPatch" for f in getattr(module, "weight_function", ())):
            raise CrdiffError(f"the model is partly loaded (low-VRAM mode: {name} is patched per use), so its LoRA-"
                              "patched weights cannot be read for CR-Diff's thresholds; run ComfyUI with more "
                              "memory for the model (e.g. --normalvram or --highvram)")
