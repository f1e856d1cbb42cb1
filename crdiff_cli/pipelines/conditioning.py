"""Image conditioning: ControlNet, img2img and inpainting around the same dual UNet.

These are diffusers' own pipelines (ControlNet, Img2Img, Inpaint and their combinations, picked by
diffusers' ``AutoPipelineFor*.from_pipe``), built from the loaded pipeline's components; crdiff then
replaces their ``unet`` by the :class:`~crdiff_cli.dual.unet.DualUNet` as for text-to-image. Nothing
CR-Diff-specific is needed inside them:

- ControlNet: the pipeline runs the ControlNet once per step and hands its down/mid residuals to the
  UNet call as keyword arguments (``down_block_additional_residuals``, ``mid_block_additional_residual``);
  the DualUNet passes the same keyword arguments to its dense and its pruned pass, so both branches get
  the same residuals from one ControlNet pass.
- img2img / inpainting: the pipeline noises the encoded init image to ``strength`` and denoises from
  there with ordinary UNet calls.

Every input is checked (files readable, values in range, ControlNet shaped like the UNet where its
config can be read without loading) before any model is loaded: :meth:`ImageInputs.check`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from crdiff_cli.errors import CrdiffError, ParameterError

DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
# UNet config entries a ControlNet must share with the UNet it conditions (its residuals' shapes follow them).
_MATCHING = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
             "transformer_layers_per_block")


@dataclass
class ImageInputs:
    """What a generation is conditioned on besides the text: ControlNet and/or an init image (+ mask)."""

    controlnet: str | None = None
    control_image: Path | None = None
    control_scale: float = 1.0
    init_image: Path | None = None
    strength: float | None = None  # None: DEFAULT_STRENGTH with an init image
    mask_image: Path | None = None
    _images: dict = field(default_factory=dict, repr=False)

    @property
    def active(self) -> bool:
        return self.controlnet is not None or self.init_image is not None

    def check(self, model: str, *, onnx: bool = False) -> None:
        """Refuse inconsistent flags, unreadable images and a mismatched ControlNet, without loading any model."""
        if self.control_image is not None and self.controlnet is None:
            raise ParameterError("control_image", None, "needs controlnet MODEL (the ControlNet that reads it)",
                                 mentions=("controlnet",))
        if self.controlnet is not None and self.control_image is None:
            raise ParameterError("controlnet", self.controlnet, "needs control_image IMG (its conditioning image)",
                                 mentions=("control_image",))
        if not math.isfinite(self.control_scale) or self.control_scale < 0:
            raise ParameterError("control_scale", f"{self.control_scale:g}", "must be a finite number >= 0 (default 1.0)")
        if self.init_image is None and (self.strength is not None or self.mask_image is not None):
            raise ParameterError("strength", None, "and mask_image need init_image IMG (the image to start from)",
                                 mentions=("mask_image", "init_image"))
        if self.strength is not None and not (math.isfinite(self.strength) and 0 < self.strength <= 1):
            raise ParameterError("strength", f"{self.strength:g}", "must lie in (0, 1] (1 = start from pure noise; "
                                 f"default {DEFAULT_STRENGTH})")
        if onnx and self.controlnet is not None:
            raise CrdiffError("ControlNet residuals cannot enter an .onnx artifact's graph; use a .safetensors "
                              "artifact or --model without --artifact")
        self._read_images()
        if self.controlnet is not None:
            from crdiff_cli.pipelines.loading import peek_unet_config

            config = _local_controlnet_config(self.controlnet)
            if config is not None:
                check_controlnet_fits(config, peek_unet_config(model), self.controlnet)

    def pipeline(self, pipe, dtype=None):
        """diffusers' pipeline for these inputs, sharing ``pipe``'s components (``pipe`` itself if none)."""
        if not self.active:
            return pipe
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        extra = {}
        if self.controlnet is not None:
            extra["controlnet"] = load_controlnet(self.controlnet, pipe.unet, dtype)
        auto = (AutoPipelineForText2Image if self.init_image is None else
                AutoPipelineForInpainting if self.mask_image is not None else AutoPipelineForImage2Image)
        try:
            task = auto.from_pipe(pipe, **extra)
        except (ValueError, KeyError) as exc:  # diffusers has no such combination for this model family
            raise CrdiffError(f"diffusers has no {auto.__name__.removeprefix('AutoPipelineFor')} pipeline for "
                              f"{type(pipe).__name__}{' with ControlNet' if extra else ''} ({exc})") from None
        task.set_progress_bar_config(disable=True)
        return task

    def call_kwargs(self, height: int, width: int) -> dict:
        """Keyword arguments of the pipeline call besides prompt, steps, guidance and generator.

        Every image is resized to the target resolution; img2img pipelines take the size from the init
        image (they have no ``height``/``width``), the others are given it.
        """
        images = {flag: image.resize((width, height), _resample()) for flag, image in self._read_images().items()}
        plain_img2img = self.init_image is not None and self.mask_image is None and self.controlnet is None
        kwargs = {} if plain_img2img else {"height": height, "width": width}
        if self.init_image is not None:
            kwargs.update(image=images["--init-image"], strength=self.strength_or_default)
            if self.mask_image is not None:
                kwargs["mask_image"] = images["--mask-image"]
        if self.controlnet is not None:
            kwargs["control_image" if self.init_image is not None else "image"] = images["--control-image"]
            kwargs["controlnet_conditioning_scale"] = self.control_scale
        return kwargs

    def _read_images(self) -> dict:
        """``{flag: RGB image}``, each file decoded once (at :meth:`check`, so a broken one fails early)."""
        for flag, path in (("--control-image", self.control_image), ("--init-image", self.init_image),
                           ("--mask-image", self.mask_image)):
            if path is not None and flag not in self._images:
                self._images[flag] = read_image(path, flag)
        return self._images

    def check_steps(self, steps: int) -> None:
        """Refuse an img2img run that would denoise nothing: diffusers runs ``int(steps * strength)`` of the
        steps (``steps 4, strength 0.2`` runs none and returns the init image barely changed; ``steps 1,
        strength 0.5`` fails inside the pipeline)."""
        if self.init_image is None:
            return
        strength = self.strength_or_default
        if int(steps * strength) < 1:
            needed = math.ceil(1 / strength - 1e-9)
            raise ParameterError("strength", f"{strength:g}", f"with steps {steps} denoises int({steps} x {strength:g}) "
                                 f"= 0 times; raise steps to at least {needed}, or strength",
                                 mentions=("steps", "strength"))

    @property
    def strength_or_default(self) -> float:
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    def info(self) -> dict:
        """What image parameters and the manifest record about these inputs."""
        info: dict = {}
        if self.controlnet is not None:
            info.update(controlnet=self.controlnet, control_image=str(self.control_image),
                        control_scale=self.control_scale)
        if self.init_image is not None:
            info.update(init_image=str(self.init_image), strength=self.strength_or_default)
            if self.mask_image is not None:
                info["mask_image"] = str(self.mask_image)
        return info

    def denoising_calls(self, pipe, steps: int) -> int:
        """UNet steps per image: img2img skips the first ``1 - strength`` of the schedule (as diffusers does)."""
        import copy

        from crdiff_cli.pipelines.schedulers import denoising_calls

        if self.init_image is None:
            return denoising_calls(pipe, steps)
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps)
        skipped = steps - min(int(steps * self.strength_or_default), steps)
        return len(scheduler.timesteps[skipped * scheduler.order:])


def read_image(path: Path, flag: str):
    """An RGB PIL image, fully decoded now so that a broken file fails before any model loads."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise CrdiffError(f"{flag} {path} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CrdiffError(f"{flag} {path} is not a readable image ({exc}); pass a PNG or JPEG file") from None


def _resample():
    from PIL import Image

    return Image.Resampling.LANCZOS


def _local_controlnet_config(controlnet: str) -> dict | None:
    """The config of a ControlNet folder (None for a hub id); refuses a folder that is not a ControlNet."""
    path = Path(controlnet).expanduser()
    if not path.exists():
        if controlnet.count("/") == 1 and not controlnet.startswith((".", "/", "~")):
            return None  # a hub id: checked once loaded
        raise CrdiffError(f"--controlnet {controlnet} does not exist; pass a diffusers ControlNet folder or hub id")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CrdiffError(f"--controlnet {controlnet} is not a diffusers ControlNet folder (no readable "
                          "config.json)") from None
    if config.get("_class_name") != "ControlNetModel":
        raise CrdiffError(f"--controlnet {controlnet} holds a {config.get('_class_name')}, not a ControlNetModel")
    return config


def check_controlnet_fits(config: dict, unet_config, controlnet: str) -> None:
    """Refuse a ControlNet whose residuals cannot match the UNet (another architecture or family)."""
    if unet_config is None:
        return
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)

    def norm(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in _MATCHING:
        if key in config and norm(config[key]) != norm(get(key, config[key])):
            raise CrdiffError(f"--controlnet {controlnet} does not match this UNet ({key} {norm(config[key])} vs "
                              f"{norm(get(key))}); use a ControlNet trained for this base model")


def load_controlnet(controlnet: str, unet, dtype=None):
    """The ControlNet (safetensors weights only), checked against ``unet``."""
    from diffusers import ControlNetModel

    from crdiff_cli.errors import first_line

    try:
        model = ControlNetModel.from_pretrained(Path(controlnet).expanduser() if Path(controlnet).expanduser().exists()
                                                else controlnet, torch_dtype=dtype or unet.dtype, use_safetensors=True)
    except Exception as exc:  # diffusers raises many types for a missing or broken model
        raise CrdiffError(f"cannot load --controlnet {controlnet} ({first_line(exc)}); pass a diffusers ControlNet "
                          "folder with .safetensors weights or a cached hub id") from None
    check_controlnet_fits(dict(model.config), unet.config, controlnet)
    return model.to(unet.device).eval().requires_grad_(False)
