"""Generating images with a diffusers pipeline: the settings that determine an image, one generator per image.

One image per (prompt, seed), each with its own CPU generator, so an image never depends on what else was
generated in the same call or run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crdiff_cli import defaults
from crdiff_cli.errors import ParameterError
from crdiff_cli.pipelines.schedulers import SCHEDULERS
from crdiff_cli.pruning.resolution import Resolution

if TYPE_CHECKING:
    from crdiff_cli.pipelines.conditioning import ImageInputs


@dataclass
class GenerationSettings:
    """Everything that determines an image besides the model weights."""

    resolution: Resolution
    steps: int = defaults.STEPS
    guidance: float = defaults.GUIDANCE
    negative_prompt: str | None = None
    scheduler: str | None = None  # None: the model's own
    inputs: "ImageInputs | None" = None  # ControlNet / init image (crdiff_cli.pipelines.conditioning); None: text only

    def __post_init__(self):
        from crdiff_cli.validation import check_finite

        check_finite("guidance", self.guidance)
        if self.steps < 1:
            raise ParameterError("steps", self.steps, "must be at least 1")
        if self.inputs is not None:
            self.inputs.check_steps(self.steps)
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ParameterError("scheduler", repr(self.scheduler), f"is unknown; choose one of {', '.join(SCHEDULERS)}")


def generate_image(pipe, prompt: str, seed: int, settings: GenerationSettings,
                   on_step: Callable[[], None] | None = None):
    """One image for ``prompt`` with a CPU generator seeded by ``seed``."""
    return generate_images(pipe, [prompt], [seed], settings, on_step)[0]


def generate_images(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                    on_step: Callable[[], None] | None = None) -> list:
    """One image per ``(prompts[i], seeds[i])`` in a single pipeline call, each with its own CPU generator.

    The starting noise of image i depends only on ``seeds[i]``. A single image is requested exactly as
    `crdiff generate` does (plain prompt and generator). Several images share the UNet and VAE calls,
    whose CPU kernels round differently with the batch size, so pixels can differ by a level from the
    one-at-a-time images (docs/evaluate.md).
    """
    import torch

    def callback(_pipe, _step, _t, kwargs):
        if on_step:
            on_step()
        return kwargs

    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    single = len(prompts) == 1
    negative = settings.negative_prompt
    height, width = settings.resolution.height, settings.resolution.width
    sizes_and_images = settings.inputs.call_kwargs(height, width) if settings.inputs else dict(height=height, width=width)
    return pipe(prompts[0] if single else list(prompts),
                negative_prompt=negative if single or negative is None else [negative] * len(prompts),
                **sizes_and_images, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                generator=generators[0] if single else generators, callback_on_step_end=callback).images
