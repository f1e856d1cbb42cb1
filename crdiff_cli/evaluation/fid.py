"""FID of generated images against a folder of real images, with torchmetrics (Inception from torch-fidelity).

Why torchmetrics: it is installed with the project's stack, maintained (Lightning AI), keeps running
sums so features never pile up in memory, and its ``FrechetInceptionDistance`` uses torch-fidelity's
port of the TensorFlow FID Inception (``pt_inception-2015-12-05``), the network behind the usual FID
numbers; it takes that network's weights from a local file (``feature_extractor_weights_path``), so it
runs offline. (clean-fid downloads its weights itself and needs torchvision.)

torch-fidelity is installed with ``--no-deps`` (its requirements would replace the pinned torch by
pulling torchvision). Its package ``__init__`` imports its dataset helpers, which need torchvision, so
:func:`fid_class` registers ``torch_fidelity`` as a bare package (its ``__init__`` never runs) before
torchmetrics imports the one module it needs, ``feature_extractor_inceptionv3`` (plain torch).
The weights file is read by torch-fidelity with ``torch.load``, whose default is ``weights_only=True``
on the torch this project requires (>= 2.6): a pickle cannot run code.

Preprocessing (``--fid-resize``, :class:`FidScorer`'s ``resize``) is an explicit choice because FID depends
on it: ``256`` resizes every image, generated and real alike, to 256x256 with PIL's bicubic filter (the
aspect ratio is not kept), as the CR-Diff authors' evaluation code does before computing its metrics;
``none`` feeds the images as they are. Either way the Inception network then resizes to 299x299 itself.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from crdiff_cli.errors import CrdiffError, ParameterError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
DEFAULT_WEIGHTS = Path("~/.cache/torch/hub/checkpoints") / INCEPTION_FILE  # where torch-fidelity downloads it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INSTALL_HINT = "pip install --no-deps torch-fidelity==0.3.0"
FID_RESIZES = {"256": 256, "none": None}  # --fid-resize: the paper's 256x256 bicubic, or the images as they are
DEFAULT_FID_RESIZE = "256"  # reproduces the paper's FID preprocessing


def parse_fid_resize(text: str) -> int | None:
    """``--fid-resize``: ``"256"`` -> 256 (the side of the bicubic resize), ``"none"`` -> None."""
    key = str(text).strip().lower()
    if key not in FID_RESIZES:
        raise ParameterError("fid_resize", text, "must be 256 (both image sets resized to 256x256, bicubic, as the "
                             "paper's evaluation does) or none (the images as they are)")
    return FID_RESIZES[key]


def resize_label(resize: int | None) -> str:
    """How a run records the choice (results.json, the journal's identity): ``"256"`` or ``"none"``."""
    return "none" if resize is None else str(resize)


def resize_description(resize: int | None) -> str:
    if resize is None:
        return "images as they are (no resize before Inception)"
    return f"generated and real images resized to {resize}x{resize} (PIL bicubic, aspect ratio not kept)"


def preprocess(image, resize: int | None = None):
    """What FID's Inception sees of a PIL image: an HxWx3 uint8 array, after the ``resize`` preprocessing.

    The resize is done in the image's own mode and then converted to RGB, as resizing the file with PIL and
    reading the saved PNG back does.
    """
    import numpy as np
    from PIL import Image

    if resize is not None:
        image = image.resize((resize, resize), Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"))


def reference_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (sorted; sub-folders are not searched)."""
    if not folder.is_dir():
        raise CrdiffError(f"--reference-images {folder} is not a folder; pass a folder of real images (e.g. COCO val2014)")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def weights_path(arg: str | None) -> Path:
    path = Path(arg).expanduser() if arg else DEFAULT_WEIGHTS.expanduser()
    if not path.is_file():
        raise CrdiffError(f"FID Inception weights {path} not found; download {INCEPTION_FILE} (torch-fidelity's "
                          f"release page) and pass fid:PATH, or put it at {DEFAULT_WEIGHTS}")
    return path


def check_available() -> None:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise CrdiffError(f"the fid metric needs torch-fidelity's Inception network: {INSTALL_HINT}")


def _torchmetrics_fid():
    """``torchmetrics.image.fid``, importing torch-fidelity (if installed) as a bare package first."""
    spec = None if "torch_fidelity" in sys.modules else importlib.util.find_spec("torch_fidelity")
    if spec is not None:
        bare = types.ModuleType("torch_fidelity")
        bare.__path__, bare.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["torch_fidelity"] = bare
    import torchmetrics.image.fid

    return torchmetrics.image.fid


def fid_class():
    """torchmetrics' ``FrechetInceptionDistance``, with torch-fidelity's Inception importable without torchvision."""
    check_available()
    return _torchmetrics_fid().FrechetInceptionDistance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)``, computed as torchmetrics does (float64)."""
    import torch

    t = [torch.as_tensor(x, dtype=torch.float64) for x in (mu1, sigma1, mu2, sigma2)]
    return float(_torchmetrics_fid()._compute_fid(*t))


class FidScorer:
    """FID of image sets against one reference set, whose Inception statistics are computed once.

    ``resize``: the preprocessing of every image, reference and generated alike (:func:`preprocess`):
    ``256`` for the paper's 256x256 bicubic resize, ``None`` for the images as they are.
    """

    name = "fid"

    def __init__(self, weights: Path, references: list[Path], device: str = "cpu", batch_size: int = 16,
                 resize: int | None = None):
        self.metric = fid_class()(feature=2048, reset_real_features=False,
                                  feature_extractor_weights_path=str(weights)).to(device)
        self.device, self.batch_size, self.resize = device, batch_size, resize
        self._update(references, real=True)

    def _update(self, paths: list[Path], real: bool) -> None:
        import numpy as np
        import torch
        from PIL import Image

        def flush(batch):
            if batch:
                self.metric.update(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device), real=real)

        batch = []
        for path in paths:
            with Image.open(path) as im:
                array = preprocess(im, self.resize)
            if batch and (array.shape != batch[0].shape or len(batch) == self.batch_size):
                flush(batch)
                batch = []
            batch.append(array)
        flush(batch)

    def distance(self, images: list[Path]) -> float:
        """FID of ``images`` (files) against the reference set."""
        self.metric.reset()  # clears the generated-image statistics only (reset_real_features=False)
        self._update(images, real=False)
        return float(self.metric.compute())
