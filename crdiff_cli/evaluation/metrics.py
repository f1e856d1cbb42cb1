"""The metrics of `crdiff evaluate`: specs like the search's ``--scorer``, checked before anything loads.

``imagereward[:CKPT]``, ``clip:MODEL``, ``pickscore:MODEL``, ``aesthetic:HEAD`` and ``tiny`` score each
image (the scorers of :mod:`crdiff_cli.scorers`); ``fid[:INCEPTION_WEIGHTS]`` scores a whole set of images
against ``--reference-images``. CLIP is reported as the paper does, the plain cosine similarity
(~0.31 for SD models), not the 100x CLIP score the search uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.errors import CrdiffError

LABELS = {"fid": "FID", "clip": "CLIP", "imagereward": "ImageReward", "pickscore": "PickScore",
          "aesthetic": "Aesthetic", "tiny": "tiny"}
PAPER_ORDER = tuple(LABELS)  # Table 7's column order
DEFAULT_METRICS = "imagereward"


@dataclass(frozen=True)
class MetricSpec:
    """One ``--metrics`` entry: ``name`` plus its argument (weights), with how to read it."""

    name: str
    arg: str | None = None

    @property
    def spec(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def per_image(self) -> bool:
        return self.name != "fid"

    @property
    def higher_is_better(self) -> bool:
        return self.name != "fid"


def parse_metrics(text: str, *, reference_images: Path | None, num_generated: int,
                  reference_files: list[Path] | None = None, sampler_uses_reference: bool = False) -> list[MetricSpec]:
    """Parse and check ``--metrics`` (names, weights files, FID's reference folder) without loading anything.

    ``reference_files``: FID's real images when they are not the whole folder (the COCO images of the
    ``paper`` prompt set); ``sampler_uses_reference``: the folder also decides the prompts (the ``paper``
    sampler skips images missing from it), so it is accepted without ``fid``.
    """
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise CrdiffError(f"--metrics {text!r} has an empty entry; write e.g. imagereward,clip:MODEL,fid")
        name, _, arg = part.partition(":")
        spec = MetricSpec(name.strip(), arg.strip() or None)
        if spec.name not in LABELS:
            raise CrdiffError(f"unknown metric {spec.name!r} in --metrics; choose from {', '.join(LABELS)}")
        if any(s.name == spec.name for s in specs):
            raise CrdiffError(f"metric {spec.name!r} is given twice in --metrics; keep one")
        _check_files(spec, reference_images, num_generated, reference_files)
        specs.append(spec)
    if reference_images is not None and not sampler_uses_reference and not any(s.name == "fid" for s in specs):
        raise CrdiffError("--reference-images is only used by the fid metric; add fid to --metrics or drop it")
    return sorted(specs, key=lambda s: PAPER_ORDER.index(s.name))


def _check_files(spec: MetricSpec, reference_images: Path | None, num_generated: int,
                 reference_files: list[Path] | None = None) -> None:
    name, arg = spec.name, spec.arg
    if name in ("clip", "pickscore"):
        if not arg:
            raise CrdiffError(f"metric {name!r} needs a model: {name}:MODEL (a folder or a cached hub id)")
        _check_model(name, arg)
    elif name == "imagereward":
        from crdiff_cli.scorers.imagereward import resolve_files
        resolve_files(arg)
    elif name == "aesthetic":
        if not arg or not Path(arg).expanduser().is_file():
            raise CrdiffError(f"metric 'aesthetic' needs an existing head file: aesthetic:PATH (got {arg!r}); see "
                              "docs/evaluate.md for the LAION v2 and v2.5 files")
    elif name == "tiny" and arg:
        raise CrdiffError(f"metric 'tiny' takes no argument (got {arg!r})")
    elif name == "fid":
        from crdiff_cli.evaluation.fid import check_available, reference_images as list_images, weights_path
        if reference_images is None:
            raise CrdiffError("metric fid needs --reference-images DIR (a folder of real images, e.g. COCO val2014)")
        found = len(list_images(reference_images) if reference_files is None else reference_files)
        if found < 2:
            which = "" if reference_files is None else " of the prompt set"
            raise CrdiffError(f"--reference-images {reference_images} has {found} image(s){which}; FID needs at "
                              "least 2 (thousands for a meaningful value)")
        if num_generated < 2:
            raise CrdiffError(f"FID needs at least 2 generated images per variant (got {num_generated}); raise "
                              "--num-images or give more prompts")
        weights_path(arg)
        check_available()


def _check_model(name: str, arg: str) -> None:
    path = Path(arg).expanduser()
    if path.is_dir():
        return
    if arg.count("/") == 1 and not arg.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(arg, "config.json"), str):
            return
        raise CrdiffError(f"{name} model {arg!r} is not in the local Hugging Face cache; download it with "
                          f"`hf download {arg}` or pass a local folder")
    raise CrdiffError(f"{name} model folder {arg} does not exist; pass a folder saved with save_pretrained or a hub id")


class ImageMetric:
    """A per-image metric: a scorer, with CLIP's 100x score turned back into the paper's cosine."""

    def __init__(self, spec: MetricSpec, device: str):
        from crdiff_cli.scorers import load_scorer
        from crdiff_cli.scorers.clip import CLIP_SCALE

        self.spec = spec
        if spec.name == "aesthetic":
            from crdiff_cli.scorers.aesthetic import load
            self.scorer = load(spec.arg, device)
        else:
            self.scorer = load_scorer(spec.spec, device=device)
        self.scale = 1 / CLIP_SCALE if spec.name == "clip" else 1.0

    def score(self, images, prompts) -> list[float]:
        return [s * self.scale for s in self.scorer.score(images, prompts)]


def load_metrics(specs: list[MetricSpec], *, device: str, reference_images: Path | None,
                 reference_files: list[Path] | None = None, fid_resize: int | None = None):
    """``(per-image metrics, FID scorer or None)``, each model loaded once.

    FID's real images are ``reference_files`` if given, else every image of ``reference_images``;
    ``fid_resize`` is its preprocessing (:class:`crdiff_cli.evaluation.fid.FidScorer`).
    """
    image_metrics = [ImageMetric(s, device) for s in specs if s.per_image]
    fid = next((s for s in specs if s.name == "fid"), None)
    if fid is None:
        return image_metrics, None
    from crdiff_cli.evaluation.fid import FidScorer, reference_images as list_images, weights_path

    references = list_images(reference_images) if reference_files is None else list(reference_files)
    return image_metrics, FidScorer(weights_path(fid.arg), references, device, resize=fid_resize)
