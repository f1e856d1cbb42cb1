"""Text-to-image with CR-Diff on the live PyTorch path: the pipeline's UNet replaced by a DualUNet.

One image per (prompt, seed), each with its own CPU generator, so an image never depends on what else
was generated in the same run. Images are written to a temporary name and renamed, with the full
generation parameters embedded as PNG text (a ``crdiff`` JSON chunk and a human-readable
``parameters`` chunk) and collected in ``manifest.json``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from crdiff_cli import __version__
from crdiff_cli.atomic import staging_name
from crdiff_cli.errors import CrdiffError
from crdiff_cli.resolution import Resolution

if TYPE_CHECKING:
    from crdiff_cli.conditioning import ImageInputs

SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler", "euler-trailing": "EulerDiscreteScheduler",
}
# Config changes a scheduler name implies: few-step distilled models (SDXL-Turbo/Lightning) sample "trailing"
# timesteps, so that their 1-4 steps start at the last training timestep.
SCHEDULER_OPTIONS = {"euler-trailing": {"timestep_spacing": "trailing"}}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "crdiff-images/1"  # marks a folder as a generate output (crdiff_cli.image_folder)


@dataclass
class GenerationSettings:
    """Everything that determines an image besides the model weights."""

    resolution: Resolution
    steps: int = 30
    guidance: float = 7.5
    negative_prompt: str | None = None
    scheduler: str | None = None  # None: the model's own
    inputs: "ImageInputs | None" = None  # ControlNet / init image (crdiff_cli.conditioning); None: text only

    def __post_init__(self):
        from crdiff_cli.validation import check_finite

        check_finite("--guidance", self.guidance)
        if self.steps < 1:
            raise CrdiffError(f"--steps {self.steps} must be at least 1")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise CrdiffError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


@dataclass
class ImageRecord:
    """One written image and how it was made (the ``crdiff`` PNG chunk, a manifest entry)."""

    file: str
    prompt_index: int
    prompt: str
    seed: int
    variant: str  # "crdiff" or "dense"
    params: dict = field(default_factory=dict)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (UTF-8); blank lines and ``#`` comments are skipped.

    A UTF-8 byte-order mark (Windows editors write one) is dropped, so it cannot hide a first ``#``.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise CrdiffError(f"prompts file {path} does not exist; pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CrdiffError(f"cannot read prompts file {path} as UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CrdiffError(f"prompts file {path} has no prompts; write one prompt per line")
    return prompts


def check_k(k: float) -> str | None:
    """Validate the POA coefficient; returns a warning for unusually large values."""
    import math

    if not math.isfinite(k) or k < 0:
        raise CrdiffError(f"--k {k} must be a finite number >= 0 (0 = dense, 1 = pruned, >1 amplifies; paper: 1.2-1.5)")
    return f"k = {k:g} is far above the paper's range (1.2-1.5); images may degrade" if k > 3 else None


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for ``name``, keeping the model's noise schedule config."""
    if name is None:
        return
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config,
                                                                      **SCHEDULER_OPTIONS.get(name, {}))


def denoising_calls(pipe, steps: int) -> int:
    """How many UNet steps the pipeline's scheduler makes for ``steps`` (PNDM makes one more)."""
    import copy

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


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


def crdiff_info(choice, spec, k: float, masks: str) -> dict:
    """The model-info fields of a CR-Diff image (PNG ``crdiff`` chunk): k, ratios, where they came from."""
    return dict(mode="crdiff", k=k, ratios=str(choice.ratios), ratios_origin=choice.origin,
                thresholds=spec.thresholds(), masks=masks)


def image_params(prompt: str, seed: int, settings: GenerationSettings, model_info: dict) -> dict:
    return {"prompt": prompt, "negative_prompt": settings.negative_prompt, "seed": seed,
            "steps": settings.steps, "guidance": settings.guidance, "height": settings.resolution.height,
            "width": settings.resolution.width, "scheduler": settings.scheduler or "model default",
            **model_info, "crdiff_version": __version__}


def png_bytes(image, params: dict) -> bytes:
    """``image`` encoded as PNG with its parameters as text chunks (what :func:`save_png` writes)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("crdiff", json.dumps(params, sort_keys=True))
    info.add_text("parameters", human_parameters(params))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (a marked staging name, then rename)."""
    tmp = staging_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(image, path: Path, params: dict) -> None:
    """Write ``image`` with its parameters as PNG text chunks, atomically."""
    write_file(path, png_bytes(image, params))


def human_parameters(params: dict) -> str:
    """A1111-style ``parameters`` text: prompt, negative prompt, then ``key: value`` pairs."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    rest = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt")}
    lines.append(", ".join(f"{k}: {v}" for k, v in rest.items()))
    return "\n".join(lines)


def compare_grid(pairs: list[tuple[int, object, object]], title: str):
    """One labelled grid: a row per seed, dense on the left, CR-Diff on the right."""
    from PIL import Image, ImageDraw

    scale = -(-192 // pairs[0][1].size[0])  # tiny test images are enlarged so the labels fit
    pairs = [(seed, *(im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST) for im in ims))
             for seed, *ims in pairs] if scale > 1 else pairs
    width, height = pairs[0][1].size
    label_h = 14
    grid = Image.new("RGB", (2 * width, len(pairs) * (height + label_h) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), title[:120], fill="black")
    for row, (seed, dense, crdiff) in enumerate(pairs):
        top = label_h + row * (height + label_h)
        for col, (label, image) in enumerate((("dense", dense), ("CR-Diff", crdiff))):
            draw.text((col * width + 2, top + 1), f"{label}  seed {seed}", fill="black")
            grid.paste(image, (col * width, top + label_h))
    return grid


def write_manifest(out_dir: Path, records: list[ImageRecord], run: dict) -> None:
    tmp = staging_name(out_dir / MANIFEST)
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "run": run, "images": [asdict(r) for r in records]},
                              indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)


def attach_dual(loaded, spec, k: float, masks: str = "copy"):
    """Replace ``loaded.pipe.unet`` by a DualUNet over it; returns the DualUNet."""
    from crdiff_cli.dual_unet import DualUNet

    dual = DualUNet(loaded.pipe.unet, spec, k=k, masks=masks)
    loaded.pipe.unet = dual
    return dual


def run(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings, out_dir: Path, *,
        model_info: dict, dual=None, compare: bool = False,
        on_step: Callable[[], None] | None = None, on_image: Callable[[], None] | None = None,
        ranks=None) -> list[ImageRecord]:
    """Generate every (prompt, seed) into ``out_dir``; with ``compare`` also the dense image and a grid.

    The caller applies ``settings.scheduler`` first (:func:`set_scheduler`). ``dual`` is the pipeline's DualUNet (None for a dense run, or for an ONNX artifact: ``model_info["mode"]`` names the variant); the dense image of a comparison is made
    with the same DualUNet at k = 0, which is the dense model bit for bit.

    Each (prompt, seed) is one work item, encoded to PNG bytes where it is made; with ``ranks`` (a
    :class:`crdiff_cli.distributed.Ranks` under torchrun) the items are split across ranks and rank 0
    alone writes every file, in item order, so the files are the ones a single process writes.
    Records (and ``on_image`` calls) are on rank 0; the other ranks return an empty list.
    """
    from crdiff_cli.distributed import SINGLE

    ranks = ranks or SINGLE
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    variant = model_info.get("mode", "dense" if dual is None else "crdiff")  # an ONNX artifact has no DualUNet
    items = [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]

    def encoded(image, index, prompt, seed, kind, info) -> tuple[bytes, ImageRecord]:
        name = f"{index}_{seed}{'_dense' if kind == 'dense' and compare else ''}.png"
        params = image_params(prompt, seed, settings, info)
        return png_bytes(image, params), ImageRecord(name, index, prompt, seed, kind, params)

    def make(item) -> list[tuple[bytes, ImageRecord]]:
        index, prompt, seed = item
        made = [encoded(generate_image(pipe, prompt, seed, settings, on_step), index, prompt, seed, variant,
                        model_info)]
        if compare and dual is not None:
            k, dual.k = dual.k, 0.0
            try:
                dense = generate_image(pipe, prompt, seed, settings, on_step)
            finally:
                dual.k = k
            made.append(encoded(dense, index, prompt, seed, "dense", {**model_info, "mode": "dense", "k": 0.0}))
        return made

    pairs = []

    def write(round_items, results) -> None:
        from PIL import Image

        for (index, prompt, seed), made in zip(round_items, results):
            for data, record in made:
                write_file(out_dir / record.file, data)
                records.append(record)
                if on_image:
                    on_image()
            if len(made) == 2:
                image, dense = (Image.open(io.BytesIO(data)) for data, _ in made)
                pairs.append((seed, dense, image))
                if seed == seeds[-1]:
                    grid = compare_grid(pairs, f"{prompt}  (k={model_info.get('k')}, ratios {model_info.get('ratios')})")
                    save_png(grid, out_dir / f"compare_{index}.png", {"prompt": prompt, "seeds": seeds, **model_info})
                    pairs.clear()

    ranks.map(items, lambda batch: [make(item) for item in batch], on_results=write)
    if ranks.is_main:
        write_manifest(out_dir, records, {"model": model_info, "settings": {
            "steps": settings.steps, "guidance": settings.guidance, "negative_prompt": settings.negative_prompt,
            "scheduler": settings.scheduler, "resolution": str(settings.resolution)}, "seeds": seeds})
    return records
