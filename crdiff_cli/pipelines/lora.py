"""LoRA files: parse ``--lora PATH[:SCALE]``, check the file cheaply, and fuse it into a pipeline.

crdiff prunes the *LoRA-fused* weights (docs/method.md, "LoRA"): every LoRA is loaded with diffusers'
own loader (diffusers/PEFT and kohya formats), fused with its scale (``pipe.fuse_lora``) and its adapter
layers removed (``pipe.unload_lora_weights``, which keeps the fused weights), one LoRA after the other.
What remains is a plain pipeline whose UNet is exactly what a user who fused the LoRA would have, so
pruning, searching, baking and generating need nothing LoRA-specific afterwards.

The checks in :func:`check_lora` read only the safetensors header, so a missing, pickled, corrupt or
wrong-architecture LoRA is refused before any model is loaded; :func:`fuse_loras` turns what only the
loaded model can tell (a layer shape that does not fit, a LoRA matching no layer) into the same kind
of one-line error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from crdiff_cli.errors import CrdiffError

PICKLED = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
_DOWN_MARKERS = ("lora_A", "lora_down", "lora.down", "_lora.down")  # the r x in_features matrix, by format


@dataclass(frozen=True)
class LoraFile:
    """One ``--lora``: the safetensors file and the scale it is fused with."""

    path: Path
    scale: float = 1.0

    @property
    def label(self) -> str:
        """How records and journals name it: the absolute path and the scale."""
        return f"{self.path.resolve()}:{self.scale:g}"


def parse_lora(text: str) -> LoraFile:
    """``PATH[:SCALE]`` -> :class:`LoraFile` after :func:`check_lora` (a ``:`` in a path without a scale is kept)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            if not Path(text).expanduser().exists() and Path(head).expanduser().exists():
                raise CrdiffError(f"--lora {text}: the scale {tail!r} is not a number; write PATH:SCALE, e.g. "
                                  f"{head}:0.8") from None
    if not math.isfinite(scale):
        raise CrdiffError(f"--lora {text}: the scale must be a finite number, e.g. {path}:0.8")
    return LoraFile(check_lora(Path(path).expanduser()), scale)


def prepare_loras(texts: list[str] | None, model: str) -> list[LoraFile]:
    """Every ``--lora`` flag of a command, checked against ``model`` before it is loaded.

    A command calls this with its other validation and :func:`fuse_loras` right after loading the model.
    """
    from crdiff_cli.pipelines.loading import peek_unet_config

    loras = [parse_lora(t) for t in texts or []]
    if loras:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise CrdiffError("--lora needs the peft package (diffusers loads LoRAs through it): "
                              "pip install 'crdiff[lora]' (or pip install peft)")
        check_fits(loras, peek_unet_config(model), model)
    return loras


def check_lora(path: Path) -> Path:
    """The LoRA's safetensors file, after checking it exists, is not a pickle and holds LoRA weights."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            pickled = [p.name for p in path.iterdir() if p.suffix in PICKLED]
            what = (f"only pickled weights ({', '.join(pickled)}); convert them to .safetensors" if pickled and not files
                    else f"{len(files)} .safetensors files; pass the file itself")
            raise CrdiffError(f"--lora folder {path} holds {what}")
        path = files[0]
    elif not path.exists():
        raise CrdiffError(f"--lora {path} does not exist; pass a LoRA .safetensors file or a folder holding one")
    if path.suffix.lower() in PICKLED:
        raise CrdiffError(f"--lora {path} is a pickle ({path.suffix}), which can run code when loaded; "
                          "use a .safetensors LoRA (or convert it)")
    shapes = lora_shapes(path)
    if not any(any(m in key for m in _DOWN_MARKERS) for key in shapes):
        raise CrdiffError(f"--lora {path} holds no LoRA weights (no lora_A / lora_down tensors); pass a LoRA file")
    return path


def lora_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own types for damaged files
        from crdiff_cli.errors import first_line

        raise CrdiffError(f"--lora {path} is not a readable safetensors file ({first_line(exc)}); "
                          "it may be truncated or not a LoRA") from None


def cross_attention_width(path: Path) -> set[int]:
    """The text-conditioning widths a LoRA's UNet cross-attention key/value layers expect (empty if it has none)."""
    return {shape[1] for key, shape in lora_shapes(path).items()
            if "attn2" in key and ("to_k" in key or "to_v" in key) and len(shape) == 2
            and any(m in key for m in _DOWN_MARKERS)}


def check_fits(loras: list[LoraFile], unet_config: dict | None, model: str) -> None:
    """Refuse a LoRA trained for another architecture, from headers and the UNet config (None: checked at load)."""
    if unet_config is None:
        return
    width = unet_config.get("cross_attention_dim")
    width = width[0] if isinstance(width, (list, tuple)) else width
    for lora in loras:
        found = cross_attention_width(lora.path)
        if found and found != {width}:
            raise CrdiffError(f"--lora {lora.path} was trained for a model with {'/'.join(map(str, sorted(found)))}-"
                              f"wide text conditioning (SD1.5: 768, SD2: 1024, SDXL: 2048); {model}'s UNet has "
                              f"{width}: use a LoRA made for this base model")


def fuse_loras(pipe, loras: list[LoraFile]) -> None:
    """Load, fuse (with its scale) and unload each LoRA in turn: ``pipe`` keeps only the fused weights."""
    from crdiff_cli.errors import first_line

    for number, lora in enumerate(loras):
        name = f"crdiff_lora_{number}"
        try:
            pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name,
                                   use_safetensors=True)
        except Exception as exc:  # diffusers/PEFT raise many types for a LoRA that does not fit
            pipe.unload_lora_weights()
            raise CrdiffError(f"--lora {lora.path} does not fit this model ({first_line(exc)}); use a LoRA made "
                              "for this base model") from None
        if not any(name in names for names in pipe.get_list_adapters().values()):
            raise CrdiffError(f"--lora {lora.path} matches no layer of this model; use a LoRA made for this base model")
        pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
        pipe.unload_lora_weights()
