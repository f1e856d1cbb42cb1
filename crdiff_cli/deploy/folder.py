"""The ONNX pipeline folder ``crdiff bake --format onnx-pipeline`` writes, and checking one before it runs.

The layout is the one ONNX Runtime / Optimum and diffusers' ``OnnxStableDiffusionPipeline`` read, so a
deployment consumes the folder as it is::

    model_index.json            the pipeline class and its components
    crdiff.json                 what was baked (ratios, k, resolution, thresholds, POA) and every file's SHA-256
    unet/model.onnx             the dual UNet (+ model.onnx_data above protobuf's 2 GiB), config.json
    text_encoder/model.onnx     int32 input_ids (text_encoder_2/ too for SDXL), config.json
    vae_decoder/model.onnx      latent_sample -> sample, config.json
    vae_encoder/model.onnx      sample -> latent_sample (the latent mean), config.json
    tokenizer/ (tokenizer_2/)   tokenizer.json + tokenizer_config.json
    scheduler/                  scheduler_config.json

``crdiff.json`` lists every file crdiff wrote with its SHA-256. :func:`open_folder` checks the listing and the
digests before anything is loaded, so a changed, truncated or swapped file is refused in one line (digests are
cached by size and modification time, so an untouched folder costs a ``stat`` per file). This module imports
neither torch nor onnx: the torch-free runner depends on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError
from crdiff_cli.storage.atomic import lists_every_file

RECORD = "crdiff.json"
FORMAT = "crdiff-onnx-pipeline/1"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"  # Optimum's name for a component's external weights
# The two pipeline layouts: SD1.x/2.x-style (one CLIP text encoder) and SDXL-style (two, pooled embeddings, time_ids)
TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
IMAGE_MODELS = ("unet", "vae_decoder", "vae_encoder")


class PipelineFolderError(CrdiffError):
    """A folder that is not a complete, unchanged crdiff ONNX pipeline."""


def components(layout: str) -> tuple[str, ...]:
    """The ONNX model folders of a pipeline of ``layout`` (``sd`` or ``sdxl``)."""
    return (*TEXT_ENCODERS[layout], *IMAGE_MODELS)


@dataclass(frozen=True)
class PipelineFolder:
    """A checked pipeline folder: where it is and what ``crdiff.json`` says about it. ``locate(name)`` is where
    the record's file ``name`` lives (in the folder, or elsewhere in a Triton repository's layout)."""

    path: Path
    record: dict
    locate: Callable[[str], Path]

    @property
    def family(self) -> str:
        return self.record["family"]

    @property
    def poa_switch(self) -> bool:
        """Whether the UNet graph has the one-pass switch (input ``poa_pass``): baked with a partial policy."""
        return bool(self.record.get("poa_switch", False))

    @property
    def layout(self) -> str:
        return self.record["layout"]

    @property
    def sdxl(self) -> bool:
        return self.layout == "sdxl"

    @property
    def k(self) -> float:
        return float(self.record["k"])

    def model(self, component: str) -> Path:
        return self.locate(f"{component}/{MODEL_FILE}")

    def config(self, component: str) -> dict:
        return read_json(self.path / component / "config.json")

    def scheduler_config(self) -> dict:
        return read_json(self.path / "scheduler" / "scheduler_config.json")

    def dtype(self, component: str) -> str:
        """``float32`` or ``float16``: the dtype ``component``'s graph takes and returns."""
        return self.record["components"][component]["dtype"]


def resolution_range(height: int, width: int) -> dict[str, list[int]]:
    """The pixel sizes a folder baked for ``height`` x ``width`` serves: half to 1.5 times each side, in steps of
    8 (the shapes ``TENSORRT.md`` builds engines for; CR-Diff's ratios are tuned for the baked size)."""
    def step(value: float) -> int:
        return max(8, int(value) // 8 * 8)

    return {"min": [step(height / 2), step(width / 2)], "max": [step(height * 1.5), step(width * 1.5)]}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineFolderError(f"{path} is missing; the pipeline folder is incomplete: re-bake it or copy it "
                                  "whole") from None
    except (OSError, ValueError) as exc:
        raise PipelineFolderError(f"{path} is not readable JSON ({exc}); re-bake the folder or copy it whole") from None
    if not isinstance(data, dict):
        raise PipelineFolderError(f"{path} is not a JSON object; re-bake the folder or copy it whole")
    return data


def holds_only_ours(path: Path) -> bool:
    """A pipeline folder whose every file crdiff listed in its record (``--overwrite`` may replace it)."""
    return lists_every_file(path, RECORD, "crdiff-onnx-pipeline/")


def open_folder(path: Path, locate: Callable[[str], Path] | None = None) -> PipelineFolder:
    """Check the pipeline folder at ``path``: its record, every listed file present with its SHA-256, the
    components its layout needs; one :class:`PipelineFolderError` line otherwise. ``locate`` maps a listed
    file to where it is, when not under ``path``."""
    path = Path(path)
    locate = locate or (lambda name: path / name)
    if not path.is_dir():
        raise PipelineFolderError(f"pipeline folder {path} does not exist; bake one with `crdiff bake --format "
                                  "onnx-pipeline --out DIR`")
    if not (path / RECORD).is_file():
        raise PipelineFolderError(f"{path} has no {RECORD}: it is not a crdiff ONNX pipeline folder; bake one with "
                                  "`crdiff bake --format onnx-pipeline`")
    record = read_json(path / RECORD)
    if record.get("format") != FORMAT:
        raise PipelineFolderError(f"{path / RECORD} has format {record.get('format')!r}; this crdiff reads {FORMAT}: "
                                  "re-bake the folder or upgrade crdiff")
    try:
        layout, files = _check_record(record)
        needed = components(layout)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineFolderError(f"{path / RECORD} is damaged ({type(exc).__name__}: {exc}); re-bake the "
                                  "folder") from None
    _check_model_index(path, needed)
    wanted = dict.fromkeys([*(f"{c}/{MODEL_FILE}" for c in needed), *files])  # each once, in order
    missing = [name for name in wanted if not locate(name).is_file()]
    if missing:
        raise PipelineFolderError(f"{locate(missing[0])} is missing{_more(missing)}; the pipeline folder is "
                                  "incomplete: copy it whole or re-bake it")
    unlisted = [f"{c}/{MODEL_FILE}" for c in needed if f"{c}/{MODEL_FILE}" not in files]
    if unlisted:
        raise PipelineFolderError(f"{path / RECORD} does not list {unlisted[0]}; re-bake the folder")
    _check_digests(locate, files)
    return PipelineFolder(path, record, locate)


def _check_record(record: dict) -> tuple[str, dict[str, str]]:
    """``(layout, files)`` of a record whose every field the runner reads has its type (``crdiff.json`` is the
    one file without a digest); KeyError, TypeError or ValueError otherwise."""
    layout, files = record["layout"], dict(record["files"])
    if layout not in TEXT_ENCODERS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(TEXT_ENCODERS)}")
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(files[name], str):
            raise ValueError(f"the file entry {name!r} is not a path inside the folder with its SHA-256")
    for component in components(layout):
        if record["components"][component]["dtype"] not in ("float32", "float16"):
            raise ValueError(f"{component} has dtype {record['components'][component]['dtype']!r}")
    sizes = [record["resolution"]["height"], record["resolution"]["width"], *record["resolution_range"]["min"],
             *record["resolution_range"]["max"]]
    if len(sizes) != 6 or not all(isinstance(v, int) and v > 0 for v in sizes):
        raise ValueError("resolution and resolution_range must hold positive integer pixel sizes")
    float(record["k"])
    PoaPolicy.from_dict(record["poa"])
    if not isinstance(record.get("poa_switch", False), bool):
        raise ValueError(f"poa_switch is {record['poa_switch']!r}, not true or false")
    str(record["family"]), str(record["base_model"]), dict(record["ratios"]), dict(record["thresholds"])
    return layout, files


def vae_scale(vae_config) -> int:
    """Image pixels per latent pixel of a VAE with this config (8 for SD1.x/2.x/XL)."""
    return 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)


def _check_model_index(path: Path, needed: tuple[str, ...]) -> None:
    index = read_json(path / "model_index.json")
    absent = [c for c in needed if not isinstance(index.get(c), list) or index[c][0] is None]
    if absent:
        raise PipelineFolderError(f"{path / 'model_index.json'} names no {absent[0]}{_more(absent)}, which this "
                                  "pipeline needs; it was edited or belongs to another folder: re-bake it")


def _check_digests(locate: Callable[[str], Path], files: dict[str, str]) -> None:
    """Refuse a file whose SHA-256 differs from the record's (cached by size and modification time)."""
    from crdiff_cli.storage.digest_cache import file_sha256

    for name, digest in sorted(files.items()):
        file = locate(name)
        size = file.stat().st_size
        if file_sha256(file) != digest:
            raise PipelineFolderError(f"{file} ({size:,} bytes) does not match the SHA-256 recorded in {RECORD} when "
                                      "it was baked: it was modified, truncated or replaced; re-bake or re-copy "
                                      "the folder")


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
