"""Loading a Stable Diffusion pipeline from whatever the user names, and telling its family.

``--model`` accepts a diffusers pipeline folder, a hub id (resolved from the local Hugging Face cache;
with ``HF_HUB_OFFLINE=1`` nothing is fetched), a single-file ``.safetensors`` checkpoint, or one of the
embedded tiny models (:mod:`crdiff_cli.pipelines.tiny`). Every failure becomes one :class:`CrdiffError` line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.errors import CrdiffError, first_line
from crdiff_cli.pipelines.tiny import TINY_MODELS, tiny_model_path
from crdiff_cli.pruning.family import FAMILIES, detect_family

PRUNE_RECORD = "crdiff_prune.json"  # written by `crdiff prune`; remembers the family of a pruned folder
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Top-level module names of a diffusers UNet2DConditionModel state dict (a UNet-only checkpoint).
_UNET_TOP_LEVEL = {"conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out",
                   "add_embedding", "class_embedding", "encoder_hid_proj", "time_proj"}


@dataclass
class LoadedModel:
    """A loaded pipeline plus what crdiff needs to know about it."""

    pipe: object  # a diffusers DiffusionPipeline
    family: str
    source: str

    @property
    def unet(self):
        return self.pipe.unet


def torch_dtype(name: str):
    """``fp32``/``fp16``/``bf16`` -> torch dtype."""
    import torch

    if name not in _DTYPES:
        raise CrdiffError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[name])


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advisory warnings: crdiff shows its own."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def load_model(model: str, *, dtype: str = "fp32", device: str = "cpu") -> LoadedModel:
    """Load ``model`` (tiny name, folder, ``.safetensors`` file or hub id) as a diffusers pipeline.

    A pipeline saved with CR-Diff applied (``unet/crdiff.json``) loads as its dense model: what crdiff then
    applies is what the caller asks for, never a setting hidden in the folder.
    """
    quiet_libraries()
    if model in TINY_MODELS:
        loaded = LoadedModel(_from_folder(tiny_model_path(model), dtype), TINY_MODELS[model], model)
    elif _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise CrdiffError(f"model path {model} does not exist; pass a diffusers folder, a .safetensors "
                              f"checkpoint, a hub id, or one of {', '.join(TINY_MODELS)}")
        if path.is_dir():
            loaded = LoadedModel(_from_folder(path, dtype), "unknown", model)
        else:
            loaded = LoadedModel(_from_single_file(path, dtype), "unknown", model)
    else:
        loaded = LoadedModel(_from_hub(model, dtype), "unknown", model)
    if loaded.family == "unknown":
        loaded.family = _recorded_family(model) or detect_family(loaded.pipe.unet.config)
    from crdiff_cli.dual.apply import remove_crdiff

    remove_crdiff(loaded.pipe)
    loaded.pipe.set_progress_bar_config(disable=True)
    if device != "cpu":
        loaded.pipe.to(device)
    return loaded


def peek_unet_config(model: str) -> dict | None:
    """The UNet config of ``model`` read without loading it (tiny models and pipeline folders), else None.

    Lets adapters that must fit the UNet (LoRA, ControlNet) be checked before the expensive load.
    """
    folder = tiny_model_path(model) if model in TINY_MODELS else Path(model).expanduser()
    try:
        return json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _looks_like_path(model: str) -> bool:
    """Anything but ``owner/name`` is a path (hub ids of SD pipelines always have an owner)."""
    return os.path.exists(os.path.expanduser(model)) or model.startswith((".", "/", "~")) \
        or model.endswith(".safetensors") or model.count("/") != 1


def _recorded_family(model: str) -> str | None:
    record = Path(model) / PRUNE_RECORD
    if record.is_file():
        try:
            family = json.loads(record.read_text()).get("family")
        except (OSError, ValueError):
            return None
        return family if family in FAMILIES else None
    return None


def _from_folder(path: Path, dtype: str):
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        hint = " (it looks like a UNet folder: pass the pipeline folder that contains it)" \
            if (path / "config.json").is_file() else ""
        raise CrdiffError(f"{path} is not a diffusers pipeline folder: model_index.json is missing{hint}")
    try:
        return DiffusionPipeline.from_pretrained(path, dtype=torch_dtype(dtype))
    except CrdiffError:
        raise
    except Exception as exc:  # diffusers raises many types for a broken folder
        raise CrdiffError(f"cannot load the pipeline in {path}: {first_line(exc)}; check the folder is a "
                          "complete diffusers pipeline") from None


def _from_single_file(path: Path, dtype: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    if path.suffix == ".onnx":
        raise CrdiffError(f"{path} is an ONNX file, not a model: if it is a crdiff artifact, pass it as --artifact "
                          "and its base model as --model")
    if path.suffix != ".safetensors":
        raise CrdiffError(f"{path}: only .safetensors single-file checkpoints are loaded (pickled .ckpt files "
                          "can run code); convert it to safetensors first")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
    except Exception as exc:
        raise CrdiffError(f"{path} is not a readable safetensors file ({first_line(exc)}); re-download it") from None
    if "crdiff.format" in metadata:
        raise CrdiffError(f"{path} is a crdiff artifact (a baked dual UNet), not a whole model: pass it as "
                          "--artifact and the base model it was baked from as --model")
    if keys and all(k.split(".")[0] in _UNET_TOP_LEVEL for k in keys):
        raise CrdiffError(f"{path} holds only a UNet (diffusers names, no VAE or text encoder): pass the whole "
                          "pipeline as --model (a crdiff artifact goes to --artifact)")
    sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), dtype=torch_dtype(dtype))
    except Exception as exc:
        raise CrdiffError(f"cannot load single-file checkpoint {path}: {first_line(exc)}; single-file loading "
                          "needs the base model's config in the Hugging Face cache (or use a diffusers folder)") from None


def _from_hub(model_id: str, dtype: str):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model_id, dtype=torch_dtype(dtype))
    except CrdiffError:
        raise
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "locally or on the hub"
        raise CrdiffError(f"model {model_id!r} was not found {where} ({first_line(exc)}); download it with "
                          f"`hf download {model_id}` on a connected machine, or pass a local folder") from None
