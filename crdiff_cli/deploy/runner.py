"""The torch-free text-to-image runner of a pipeline folder: load once, call per request.

It follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` call for call (prompt
encoding, SDXL's pooled embeddings and ``time_ids``, classifier-free guidance with the negative batch first,
the scheduler loop, VAE decoding and the image conversion), so the folder's image equals ``crdiff generate``'s
on the live PyTorch path within ONNX Runtime's rounding. The starting noise of image i comes from PyTorch's
CPU generator seeded with ``seeds[i]``, reproduced in numpy (:mod:`.torch_random`): a seed gives the image it
gives in ``crdiff generate``. ::

    from crdiff_cli.deploy import OnnxCrdiffPipeline

    pipe = OnnxCrdiffPipeline.from_folder("sd15-768-crdiff")   # checks digests, opens the sessions
    image = pipe("a red fox in the snow", seeds=7)[0]           # PIL images, one per prompt
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from crdiff_cli import defaults
from crdiff_cli.deploy.folder import (RECORD, TOKENIZERS, PipelineFolder, PipelineFolderError, components, open_folder,
                                      read_json, vae_scale)
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError, ParameterError


def check_request(folder: PipelineFolder, height: int | None, width: int | None, scheduler: str | None,
                  steps: int = defaults.STEPS):
    """``(height, width, scheduler)`` of a request on ``folder``, checked before any model runs: the size (the
    baked one by default) a multiple of the VAE's scale and inside the range the folder was exported for, and
    a scheduler with a numpy twin (a ``--scheduler`` name, None for the base model's), its timesteps set for
    ``steps``."""
    from crdiff_cli.deploy.schedulers import make_scheduler

    record = folder.record
    baked, limits = record["resolution"], record["resolution_range"]
    scale = vae_scale(folder.config("vae_decoder"))
    height = int(baked["height"]) if height is None else height
    width = int(baked["width"]) if width is None else width
    if min(height, width) < scale or height % scale or width % scale:
        raise CrdiffError(f"{height}x{width} (HxW): both sides must be positive multiples of {scale}")
    low, high = limits["min"], limits["max"]
    if not (low[0] <= height <= high[0] and low[1] <= width <= high[1]):
        raise CrdiffError(f"{height}x{width} (HxW) is outside the sizes this folder was exported for, "
                          f"{low[0]}x{low[1]} to {high[0]}x{high[1]} (baked at {baked['height']}x{baked['width']}); "
                          "pick a size inside or re-bake it with --res near the size you need")
    def start() -> None:  # a run's timesteps, as the pipelines set them
        sampler.set_timesteps(steps)
        if folder.sdxl:
            sampler.set_begin_index(0)  # as StableDiffusionXLPipeline does (SD1.x/2.x pipelines do not)

    try:
        sampler = make_scheduler(scheduler, folder.scheduler_config())
        start()
    except ValueError as exc:
        raise CrdiffError(str(exc)) from None
    _dry_run(sampler, steps)
    start()
    return height, width, sampler


def _dry_run(sampler, steps: int) -> None:
    """Step the schedule through on a 1-element latent, so a step count it cannot make (PNDM or DPM++ at as
    many steps as training timesteps, where diffusers fails too) is one error before any model runs."""
    probe = np.zeros((1, 1, 1, 1), dtype=np.float32)
    try:
        for t in sampler.timesteps:
            sampler.step(probe, t, sampler.scale_model_input(probe, t), noise=lambda shape: np.zeros(shape, np.float32))
    except (ValueError, IndexError) as exc:
        raise CrdiffError(f"the {sampler.name} scheduler cannot make {steps} steps on this model's schedule ({exc}); "
                          "use fewer steps") from None


def check_policy(folder: PipelineFolder, poa=None):
    """The POA policy a request runs: ``poa``, else the folder's; a partial one needs the one-pass switch."""
    policy = poa or PoaPolicy.from_dict(folder.record["poa"])
    if not policy.is_full and not folder.poa_switch:
        raise CrdiffError(f"this folder's UNet always runs both passes; POA {policy.describe()} needs a folder baked "
                          "with a POA policy (crdiff bake --format onnx-pipeline --poa-...)")
    return policy


def check_unet_metadata(folder: PipelineFolder, unet) -> None:
    """Refuse a record whose k or POA switch is not the UNet graph's (``crdiff.json`` is the one file without a
    digest; the graph carries its own metadata table). Runtimes without a session (Triton) are not checked."""
    import json

    session = getattr(unet, "session", None)
    if session is None:
        return
    table = session.get_modelmeta().custom_metadata_map
    graph_k = float(table.get("crdiff.k", "nan"))
    switch = bool(json.loads(table.get("crdiff.poa", "{}")).get("switch", False))
    if graph_k != folder.k or switch != folder.poa_switch:
        raise PipelineFolderError(f"{folder.path / RECORD} says k={folder.k:g} and poa_switch={folder.poa_switch}, "
                                  f"but its UNet graph was baked with k={graph_k:g} and poa_switch={switch}: the "
                                  "record was edited or belongs to another folder; re-bake the folder")


class OnnxCrdiffPipeline:
    """A pipeline folder's sessions, tokenizers and scheduler config, ready for requests."""

    def __init__(self, folder: PipelineFolder, models: dict, tokenizers: dict):
        self.folder = folder
        self.models = models  # component name -> a sessions.Component, or what serves its interface (Triton)
        self.tokenizers = tokenizers  # text encoder name -> callable(prompts) -> int64 ids
        self.index = read_json(folder.path / "model_index.json")
        self.unet_config = folder.config("unet")
        self.vae_config = folder.config("vae_decoder")
        self.vae_scale = vae_scale(self.vae_config)
        # SDXL conditions on each text encoder's penultimate hidden state
        self.penultimate = {e: f"hidden_states.{folder.config(e)['num_hidden_layers'] - 1}"
                            for e in models if e in TOKENIZERS} if folder.sdxl else {}

    @classmethod
    def from_folder(cls, path: Path | str | PipelineFolder, *, provider: str | None = None, threads: int | None = None,
                    bind: bool | None = None, locate: Callable[[str], Path] | None = None,
                    models: Callable[[str, Path], Callable] | None = None) -> "OnnxCrdiffPipeline":
        """Check the folder at ``path`` (:func:`~crdiff_cli.deploy.folder.open_folder`; a folder already checked is
        taken as it is) and open its sessions on
        ``provider`` (tensorrt, cuda or cpu; default the best available). ``bind`` forces IO binding on or off
        (default: on for GPU providers). ``locate`` and ``models(component, path)`` serve other layouts and
        runtimes (a Triton repository, its models called through Triton)."""
        from crdiff_cli.deploy.sessions import Component, providers_for
        from crdiff_cli.deploy.tokenizer import ClipTokenizer

        providers = providers_for(provider) if models is None else None  # a bad --provider before the digests
        folder = path if isinstance(path, PipelineFolder) else open_folder(Path(path), locate)
        if models is None:
            def models(component: str, model: Path) -> Component:
                return Component(model, providers, threads, bind, folder.dtype(component))

        needed = [c for c in components(folder.layout) if c != "vae_encoder"]  # text-to-image does not encode
        opened = {c: models(c, folder.model(c)) for c in needed}
        check_unet_metadata(folder, opened["unet"])
        tokenizers = {c: ClipTokenizer(folder.path / TOKENIZERS[c]) for c in opened if c in TOKENIZERS}
        return cls(folder, opened, tokenizers)

    def denoising_calls(self, steps: int, scheduler: str | None = None) -> int:
        """UNet calls per image for ``steps`` (PNDM makes one more), for progress display."""
        return len(check_request(self.folder, None, None, scheduler, steps)[2].timesteps)

    @property
    def provider(self) -> str:
        session = getattr(self.models["unet"], "session", None)
        return session.get_providers()[0] if session is not None else "custom"

    def __call__(self, prompts: str | list[str], *, seeds: int | list[int] = 0, negative_prompt: str | None = None,
                 steps: int = defaults.STEPS, guidance: float = defaults.GUIDANCE, height: int | None = None,
                 width: int | None = None, scheduler: str | None = None, latents: np.ndarray | None = None,
                 on_step: Callable[[], None] | None = None, poa=None) -> list:
        """One PIL image per prompt. ``seeds``: one per prompt (an int is used for every prompt); ``height`` and
        ``width`` default to the baked resolution; ``scheduler`` is a ``--scheduler`` name (default the base
        model's); ``latents`` replaces the seeded starting noise (before scaling by the scheduler's sigma);
        ``poa`` (a :class:`~crdiff_cli.dual.poa_policy.PoaPolicy`) overrides the baked POA policy, which a
        folder baked with one serves (:func:`check_policy`)."""
        from crdiff_cli.deploy.poa_steps import PolicySteps
        from crdiff_cli.deploy.torch_random import TorchCpuGenerator

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ParameterError("seeds", len(seeds), f"must give one seed per prompt ({len(prompts)})")
        height, width, sampler = check_request(self.folder, height, width, scheduler, steps)
        policy = check_policy(self.folder, poa)
        guided = guidance > 1 and self.unet_config.get("time_cond_proj_dim") is None
        conditioning = self._encode(prompts, negative_prompt, guided, height, width)
        generators = [TorchCpuGenerator(seed) for seed in seeds]
        shape = (len(prompts), self.unet_config["in_channels"], height // self.vae_scale, width // self.vae_scale)
        if latents is None:
            latents = np.concatenate([g.randn((1, *shape[1:])) for g in generators])
        elif tuple(latents.shape) != shape:
            raise ParameterError("latents", tuple(latents.shape), f"must have shape {shape}")
        latents = (latents.astype(np.float32) * np.float32(sampler.init_noise_sigma)).astype(np.float32)

        def noise(step_shape: tuple) -> np.ndarray:  # what diffusers draws with one generator per image
            return np.concatenate([g.randn((1, *step_shape[1:])) for g in generators])

        unet = self.models["unet"]
        scalar = self.folder.record.get("unet_conventions") == "tensorrt"  # the demo's scalar timestep
        kept = unet.keep(**conditioning)  # the same at every step: on the device once (GPU providers)
        pruned = any(t is not None for t in self.folder.record["thresholds"].values())
        steps_of = PolicySteps(policy, self.folder.k, sampler.timesteps, pruned) if self.folder.poa_switch else None
        for t in sampler.timesteps:
            model_input = np.concatenate([latents, latents]) if guided else latents
            model_input = sampler.scale_model_input(model_input, t)
            timestep = np.array(t if scalar else [t], dtype=np.float32)
            if steps_of is None:
                prediction = next(iter(unet(kept, sample=model_input, timestep=timestep).values()))
            else:
                prediction = steps_of(unet, kept, t, sample=model_input, timestep=timestep)
            if guided:
                uncond, text = np.split(prediction, 2)
                prediction = uncond + np.float32(guidance) * (text - uncond)
            latents = sampler.step(prediction, t, latents, noise=noise)
            if on_step is not None:
                on_step()
        return self._decode(latents)

    def _encode(self, prompts: list[str], negative: str | None, guided: bool, height: int, width: int) -> dict:
        """The UNet inputs that stay the same at every step: ``encoder_hidden_states`` (and SDXL's
        ``text_embeds`` and ``time_ids``), negative batch first when guided."""
        if not self.folder.sdxl:
            embeds = self._text("text_encoder", prompts)["last_hidden_state"]
            if guided:
                negatives = self._text("text_encoder", [negative or ""] * len(prompts))["last_hidden_state"]
                embeds = np.concatenate([negatives, embeds])
            return {"encoder_hidden_states": embeds}
        embeds, pooled = self._sdxl_text(prompts)
        time_ids = np.array([[height, width, 0, 0, height, width]] * len(prompts), dtype=np.float32)
        if guided:
            if negative is None and self.index.get("force_zeros_for_empty_prompt", True):
                negatives, negative_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
            else:
                negatives, negative_pooled = self._sdxl_text([negative or ""] * len(prompts))
            embeds, pooled = np.concatenate([negatives, embeds]), np.concatenate([negative_pooled, pooled])
            time_ids = np.concatenate([time_ids, time_ids])
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}

    def _sdxl_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' penultimate hidden states side by side, and the second encoder's pooled projection."""
        hidden, pooled = [], None
        for encoder in ("text_encoder", "text_encoder_2"):
            outputs = self._text(encoder, prompts)
            hidden.append(outputs[self.penultimate[encoder]])
            pooled = outputs.get("text_embeds")
        return np.concatenate(hidden, axis=-1), pooled

    def _text(self, encoder: str, prompts: list[str]) -> dict[str, np.ndarray]:
        ids = self.tokenizers[encoder](prompts).astype(np.int32)
        return self.models[encoder](input_ids=ids)

    def _decode(self, latents: np.ndarray) -> list:
        from PIL import Image

        config = self.vae_config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            latents = (latents * np.asarray(std, np.float32).reshape(shape) / np.float32(config["scaling_factor"])
                       + np.asarray(mean, np.float32).reshape(shape))
        else:
            latents = latents / np.float32(config["scaling_factor"])
        images = self.models["vae_decoder"](latent_sample=latents.astype(np.float32))["sample"]
        images = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        return [Image.fromarray(image) for image in (images * 255).round().astype("uint8")]
