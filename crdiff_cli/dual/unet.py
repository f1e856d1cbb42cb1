"""The dual UNet: a dense UNet and its pruned twin, combined by pruned output amplification (POA).

For the same inputs, with ``e_d`` the dense output and ``e_p`` the pruned output, the dual UNet returns
``e = e_d + k * (e_p - e_d)`` (``k = 0`` dense, ``k = 1`` pruned, ``k > 1`` amplified). It is a
drop-in ``unet`` for diffusers' Stable Diffusion pipelines, so every UNet call, both halves of a
classifier-free-guidance batch included, goes through it.

Memory: the twin is not a copy. During the pruned pass each target layer's ``weight`` is swapped for
its pruned version, and put back right after; every other parameter is simply the same tensor, and
outside the pruned pass the UNet is exactly the plain module (its ``state_dict``, its parameters, what
``save_pretrained`` or ``ControlNetModel.from_unet`` read). The pruned weight is either a masked copy
kept resident (``masks="copy"``: +targets' size, all copies in one allocation, see
:func:`masked_copy_slots`; saves the masking, which matters where a UNet pass is short: small latents,
GPUs) or computed per layer on the fly from the dense weight (``masks="on-the-fly"``: no resident copy,
one fused ``hardshrink`` per layer per pass, made right before the layer runs and dropped after it).

A masked copy is not left stale: each remembers which tensor, which memory and which in-place version of
it the copy was made from, and is made again before a pruned pass when any of them changed (a replaced
weight, an in-place update). A write through ``.data`` (PEFT fuses LoRAs that way) changes none of them:
:meth:`DualUNet.set_spec` also compares a sample of every weight's values (one in 997) with the copy's,
so recomputing the spec and calling ``set_spec`` (or applying again) after such a change re-makes them.
Weights created under ``torch.inference_mode`` keep no version counter; for those the sample check is the
one that notices. A weight moved to another dtype after attaching is refused (the thresholds belong to the
dtype they were taken in). One pruned pass at a time: the weights are swapped in place, so the dual UNet
refuses a second concurrent call instead of mixing the two passes' weights.

A POA policy (:mod:`crdiff_cli.dual.poa_policy`, carried out by :attr:`DualUNet.poa`) can run both passes
on part of the steps only; the default runs them at every step.

Exactness: the combination uses ``torch.lerp``, which returns ``e_d`` exactly at ``k = 0``, ``e_p``
exactly at ``k = 1`` and ``e_d`` exactly when both branches agree; ``k = 0`` and ``k = 1`` also skip the
branch whose weight is zero.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from pathlib import Path

import torch
from diffusers import ModelMixin
from torch import nn

from crdiff_cli import defaults
from crdiff_cli.dual.options import check_k, check_masks
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.dual.poa_steps import PoaSteps
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.spec import PruneSpec, check_matches, pruned_weight

SETTINGS_FILE = "crdiff.json"  # next to the dense UNet's config.json in a saved pipeline's unet/ folder
SETTINGS_FORMAT = "crdiff-dual-unet-settings/1"
_ATTACHED = "_crdiff_dual"  # attribute a UNet carries while a DualUNet is attached to it (a weak reference)


class Branch:
    """Which branch the shared target weights currently serve (read by the ONNX export's layers)."""

    pruned = False


def attached_dual(unet: nn.Module) -> "DualUNet | None":
    """The DualUNet currently attached to ``unet`` (or ``unet`` itself if it is one), else None.

    The mark must point back at this very UNet: a deep copy of an attached UNet carries the original's mark.
    """
    if isinstance(unet, DualUNet):
        return unet
    ref = unet.__dict__.get(_ATTACHED)
    dual = ref() if ref is not None else None
    return dual if dual is not None and dual.unet is unet else None


class _Target:
    """One target layer: its group, its pruned weight in the pruned pass, and how to put the dense one back.

    ``slot`` is this weight's place in the dual UNet's one buffer of masked copies (copy mode), or None
    (on-the-fly mode: the pruned weight is computed from the dense one right before the layer runs).
    ``made_from`` identifies the dense tensor (and its in-place version) the masked copy was made from.
    """

    def __init__(self, group: str, module: nn.Module, slot: torch.Tensor | None):
        self.group = group
        self.module = module
        self.slot = slot
        self.threshold: float | None = None
        self.made_from: tuple | None = None
        self.sample: torch.Tensor | None = None  # every 997th value of the dense weight the copy was made from
        self.dense: nn.Parameter | None = None  # the dense weight while the pruned one is swapped in

    def identity(self) -> tuple:
        """What the dense weight is now: the parameter, its memory and its in-place version."""
        weight = self.module._parameters["weight"]
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor keeps no version counter
            version = None
        return id(weight), weight.data_ptr(), version

    def values_changed(self) -> bool:
        """Whether the dense weight's values differ from those the copy was made from, on a sample."""
        if self.sample is None:
            return False
        with torch.no_grad():
            return not torch.equal(_sample(self.module._parameters["weight"]), self.sample)

    def remask(self, threshold: float | None, dtype: str) -> None:
        """Make the masked copy again (copy mode), in place: writing into fresh memory costs ~20x the
        masking itself (page faults), and a search re-masks at every candidate. A weight moved to another
        device since the slot was made gets a slot of its own; one moved to another dtype is refused."""
        self.threshold = threshold
        if self.slot is not None and threshold is not None:
            weight = self.module._parameters["weight"]
            _check_dtype(weight, dtype)
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, writable inside and outside
                if (self.slot.shape, self.slot.device) != (weight.shape, weight.device):
                    self.slot = torch.empty_like(weight, requires_grad=False)
                torch.hardshrink(weight, threshold, out=self.slot)
                self.sample = _sample(weight).clone()
            self.made_from = self.identity()

    def swap_in(self, dtype: str) -> None:
        """Put the pruned weight where the layer reads ``weight``: a plain tensor in the module's parameter
        table for the duration of the pass (the layer computes with it like with any weight; no
        ``nn.Parameter`` is made per call, which costs more than the swap)."""
        if self.threshold is None:
            return
        if self.slot is not None and self.made_from != self.identity():
            self.remask(self.threshold, dtype)
        self.dense = self.module._parameters["weight"]
        if self.slot is not None:
            self.module._parameters["weight"] = self.slot
        else:
            _check_dtype(self.dense, dtype)
            self.module._parameters["weight"] = pruned_weight(self.dense.detach(), self.threshold)

    def swap_out(self) -> None:
        if self.dense is not None:
            self.module._parameters["weight"] = self.dense
            self.dense = None


class DualUNet(ModelMixin):
    """A dense UNet plus its pruned twin (sharing all weights) returning ``e_d + k * (e_p - e_d)``.

    The UNet is used in place and computes exactly as before outside the pruned pass; :meth:`release`
    detaches the dual UNet and returns the plain UNet. A UNet takes one DualUNet at a time: wrapping a
    DualUNet, or a UNet that already has one, is refused (``apply_crdiff`` replaces instead).

    It is a diffusers model, so ``pipe.save_pretrained`` saves it: the dense UNet as diffusers saves any
    UNet, plus ``crdiff.json`` (ratios, thresholds, k, masks); ``DiffusionPipeline.from_pretrained`` on
    that folder gives the same dual UNet back (see :meth:`from_pretrained`).
    """

    def __init__(self, unet: nn.Module, spec: PruneSpec, k: float = defaults.K, masks: str = defaults.MASKS,
                 poa: PoaPolicy | None = None):
        super().__init__()
        check_masks(masks)
        check_k(k)
        if attached_dual(unet) is not None:
            raise CrdiffError("this UNet already has CR-Diff applied (a DualUNet); remove it first "
                              "(remove_crdiff(pipe) or dual.release()), or call apply_crdiff again, which replaces it")
        self.unet = unet
        self.k = float(k)
        self.masks = masks
        self._branch = Branch()
        self._busy = threading.Lock()  # held for a pruned pass: the weights are swapped in place
        self._released = False
        self.passes = 0  # UNet passes run so far (a step with both passes counts 2): what a policy saves, counted
        self._hooks: list = []
        groups = _checked_targets(unet, spec)  # refuse a wrong spec before any change
        targets = [(group, name, w) for group, weights in groups.items() for name, w in weights]
        slots = masked_copy_slots([w for _, _, w in targets]) if masks == "copy" else [None] * len(targets)
        self._targets = [_Target(group, unet.get_submodule(name.removesuffix(".weight")), slot)
                         for (group, name, _), slot in zip(targets, slots)]
        if masks == "on-the-fly":  # each layer's pruned weight exists only while that layer runs
            for target in self._targets:
                self._hooks.append(target.module.register_forward_pre_hook(self._pre_hook(target)))
                self._hooks.append(target.module.register_forward_hook(lambda *_, t=target: t.swap_out()))
        unet.__dict__[_ATTACHED] = weakref.ref(self)
        self.spec: PruneSpec | None = None
        self.set_spec(spec)
        self.poa = PoaSteps(poa)

    def _pre_hook(self, target: _Target):
        def swap(*_):
            if self._branch.pruned:
                target.swap_in(self.spec.dtype)
        return swap

    def set_spec(self, spec: PruneSpec) -> None:
        """Switch to another ratio set's thresholds; a masked copy is made again when its threshold changed or
        its weight did since it was masked (replaced, updated in place, or its values, on a sample).

        The spec must come from this UNet as loaded (``PruneSpec.from_unet(dual, ...)`` or ``(dual.unet, ...)``):
        one computed on another shape or in another dtype has other thresholds, and is refused here
        rather than run inexactly.
        """
        self._check_attached()
        _checked_targets(self.unet, spec)
        new = spec.thresholds()
        for target in self._targets:
            if (self.spec is None or target.threshold != new[target.group] or target.made_from != target.identity()
                    or target.values_changed()):
                target.remask(new[target.group], spec.dtype)
        self.spec = spec

    def _check_attached(self) -> None:
        if self._released:
            raise CrdiffError("this DualUNet was released (remove_crdiff or release()); apply CR-Diff again to use it")

    def forward(self, *args, **kwargs):
        self._check_attached()
        if all(t is None for t in self.spec.thresholds().values()):
            self.passes += 1
            return self.unet(*args, **kwargs)
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        kind, step = self.poa.plan(timestep, self.k)
        if kind == "both" and self.k in (0, 1):  # lerp's result is one branch: run only that one
            kind = "dense" if self.k == 0 else "pruned"
        self.passes += 2 if kind == "both" else 1
        if kind in ("dense", "cached-dense"):
            out = self.unet(*args, **kwargs)
        elif kind in ("pruned", "cached-pruned"):
            out = self._pruned(*args, **kwargs)
        else:
            return self._both(step, timestep, *args, **kwargs)
        if kind.startswith("cached-"):
            return _set_sample(out, self.poa.from_cache(_sample_of(out), self.k, kind))
        return out

    def _both(self, step: int, timestep, *args, **kwargs):
        # Both passes get the same inputs. The UNet consumes list arguments in place (T2I-Adapter residuals
        # are popped from ``down_intrablock_additional_residuals``), so the pruned pass gets its own lists;
        # the tensors themselves (ControlNet residuals included) are shared, never recomputed.
        pruned_kwargs = {name: list(v) if isinstance(v, list) else v for name, v in kwargs.items()}
        dense = self.unet(*args, **kwargs)
        pruned = self._pruned(*args, **pruned_kwargs)
        return _set_sample(dense, self.poa.combine(_sample_of(dense), _sample_of(pruned), self.k, step, timestep))

    def _pruned(self, *args, **kwargs):
        if not self._busy.acquire(blocking=False):
            raise CrdiffError("this DualUNet is already running a pruned pass (a call from another thread, or "
                              "from inside the UNet); it swaps weights in place, so it takes one call at a time")
        try:
            self._branch.pruned = True
            for target in self._targets:
                if target.slot is not None:
                    target.swap_in(self.spec.dtype)
            return self.unet(*args, **kwargs)
        finally:
            self._branch.pruned = False
            for target in self._targets:
                target.swap_out()
            self._busy.release()

    def masked_copies(self) -> list[torch.Tensor]:
        """The resident masked copies of copy mode (empty on the fly), one per pruned target weight."""
        return [t.slot for t in self._targets if t.slot is not None and t.threshold is not None]

    def release(self) -> nn.Module:
        """Detach from the UNet (its weights were never changed), free the masked copies, return the plain UNet."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._targets.clear()
        self._released = True
        if attached_dual(self.unet) is self:
            del self.unet.__dict__[_ATTACHED]
        return self.unet

    def __deepcopy__(self, memo):
        raise CrdiffError("a DualUNet cannot be deep-copied (its hooks and masked copies belong to one UNet); copy "
                          "the plain UNet and apply CR-Diff to the copy")

    def settings(self) -> dict:
        """What :meth:`save_pretrained` writes beside the dense UNet: enough to attach the same dual UNet again."""
        return {"format": SETTINGS_FORMAT, "k": self.k, "masks": self.masks, "spec": self.spec.to_dict(),
                "poa": self.poa.policy.to_dict()}

    def save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                        safe_serialization: bool = True, variant: str | None = None, max_shard_size="10GB",
                        push_to_hub: bool = False, **kwargs) -> None:
        """Save the dense UNet as diffusers does, plus ``crdiff.json`` with ratios, thresholds, k and masks.

        The options are diffusers' own (named, so that a pipeline's ``save_pretrained`` passes them on). A
        spec chosen by a custom target filter cannot be written (a function is not data), and pushing to the
        hub would upload the folder before ``crdiff.json`` is in it: both are refused.
        """
        if self.spec.target_filter is not None:
            raise CrdiffError("this dual UNet's targets were chosen by a custom target_filter, which cannot be "
                              "saved; save the plain pipeline (remove_crdiff(pipe) first) and apply again after loading")
        if push_to_hub:
            raise CrdiffError("push_to_hub with CR-Diff applied is not supported: save_pretrained to a folder, then "
                              "upload the folder")
        self.unet.save_pretrained(save_directory, is_main_process=is_main_process, save_function=save_function,
                                  safe_serialization=safe_serialization, variant=variant,
                                  max_shard_size=max_shard_size, **kwargs)
        if not is_main_process:
            return
        path = Path(save_directory) / SETTINGS_FILE
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.settings(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "DualUNet":
        """Load a folder written by :meth:`save_pretrained`: the dense UNet, then the same dual UNet over it.

        The thresholds are taken again on the loaded weights and must equal the saved ones (they do when the
        weights are the saved ones, in the same dtype); otherwise the folder is refused.
        """
        from diffusers import UNet2DConditionModel

        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CrdiffError(f"{folder} has no readable {SETTINGS_FILE} ({exc}); it is not a saved CR-Diff UNet") from None
        if settings.get("format") != SETTINGS_FORMAT:
            raise CrdiffError(f"{folder / SETTINGS_FILE} is not a {SETTINGS_FORMAT} file")
        unet = UNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        saved = PruneSpec.from_dict(settings["spec"])
        spec = PruneSpec.from_unet(unet, saved.ratios)
        if spec.thresholds() != saved.thresholds():
            raise CrdiffError(f"the UNet in {folder} gives other thresholds than {SETTINGS_FILE} records "
                              f"({spec.thresholds()} vs {saved.thresholds()}); load it in the dtype it was saved in")
        return cls(unet, spec, k=settings["k"], masks=settings["masks"], poa=PoaPolicy.from_dict(settings.get("poa")))

    def __getattr__(self, name: str):
        # Pipelines read unet.config, unet.add_embedding, ...: serve them from the dense UNet. Private names
        # (accelerate's ``_hf_hook``, ...) stay the dual UNet's own: a hook found on the inner UNet is not ours.
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(nn.Module.__getattr__(self, "unet"), name)


def _sample_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _set_sample(output, sample: torch.Tensor):
    """``output`` (a UNet's tuple or output object) with its sample replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


def _checked_targets(unet: nn.Module, spec: PruneSpec) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The UNet's target weights by group, after refusing a spec that was not computed on this UNet as loaded."""
    weights = check_matches(unet, spec)
    dtypes = {str(p.dtype).removeprefix("torch.") for ws in weights.values() for _, p in ws}
    if any(t is not None for t in spec.thresholds().values()) and dtypes != {spec.dtype}:
        raise CrdiffError(f"the prune spec's thresholds were taken on {spec.dtype} weights but this UNet's targets "
                          f"are {', '.join(sorted(dtypes))}; thresholds are exact only in the weights' own dtype: "
                          "recompute the spec on the model as loaded (PruneSpec.from_unet)")
    return weights


def masked_copy_slots(weights: list[torch.Tensor], align_bytes: int = 64) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like ``weights``: views of ONE allocation per dtype and device.

    One block of the targets' total size (0.79 GB for SD1.5) instead of 96 allocations of 0.4-50 MB:
    the masked copies are not scattered among the activations in the C allocator's heap (left at its
    defaults, glibc maps a block this large on its own; a caching allocator holds it as one segment),
    so they do not change where the dense pass's temporaries go, and :meth:`DualUNet.release` frees
    them as one block. Each slot starts at a multiple of ``align_bytes``, as aligned as a fresh tensor.
    """
    slots: list[torch.Tensor | None] = [None] * len(weights)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, w in enumerate(weights):
        kinds.setdefault((w.dtype, w.device), []).append(i)
    for (dtype, device), indices in kinds.items():
        align = max(1, align_bytes // torch.empty((), dtype=dtype).element_size())
        sizes = [-(-weights[i].numel() // align) * align for i in indices]
        with torch.inference_mode(False):  # a normal tensor: re-masked in place in and out of inference mode
            buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
        for i, chunk in zip(indices, buffer.split(sizes)):
            slots[i] = chunk[: weights[i].numel()].view(weights[i].shape)
    return slots


def resident_bytes(module: nn.Module) -> int:
    """Bytes of all distinct tensors a module keeps (parameters, buffers and a dual UNet's masked copies,
    shared ones counted once)."""
    tensors = list(module.parameters()) + list(module.buffers())
    dual = attached_dual(module)
    if dual is not None:
        tensors += dual.masked_copies()
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """Every 997th value of a weight (a cheap witness that its values changed; 997 is prime, so the sample
    runs across rows and columns)."""
    return weight.detach().reshape(-1)[::997]


def _check_dtype(weight: torch.Tensor, dtype: str) -> None:
    """Thresholds belong to the dtype they were taken in: refuse a weight converted since."""
    if str(weight.dtype).removeprefix("torch.") != dtype:
        raise CrdiffError(f"a target weight is {weight.dtype} now, but the thresholds were taken on {dtype} weights; "
                          "apply CR-Diff again after changing the model's dtype")

