"""Checks of user input shared by every command: finite numbers, prompts, devices.

Each raises a one-line :class:`CrdiffError` (exit 2) and runs before any model is loaded.
:func:`crdiff_cli.cli.shared.command` applies :func:`check_finite` to every float flag of every command,
so a command only calls :func:`check_prompt` and :func:`check_device` itself.
"""

from __future__ import annotations

import math

from crdiff_cli.errors import CrdiffError, ParameterError


def check_finite(param: str, value: float) -> float:
    """Refuse NaN and infinities (``guidance=nan`` would silently disable guidance and break JSON).

    ``param`` is the parameter's name; the CLI shows its flag (:class:`ParameterError`).
    """
    if not math.isfinite(value):
        raise ParameterError(param, value, "must be a finite number")
    return value


def check_prompt(flag: str, text: str | None, *, empty_ok: bool = False) -> str | None:
    """Refuse an empty or whitespace-only prompt (None, an omitted optional prompt, passes).

    ``empty_ok``: ``""`` itself is a meaningful value (a negative prompt: the reference search passes ``""``,
    which conditions SDXL differently from none); whitespace alone is still refused as a slip.
    """
    if text is not None and not text.strip() and not (empty_ok and text == ""):
        raise CrdiffError(f"{flag} is empty; write the prompt text, or omit the flag")
    return text


def check_device(device: str) -> None:
    """Refuse a device this torch cannot run on (``gpu0``, ``cuda`` on a CPU-only build, a missing index)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise CrdiffError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N (e.g. cuda:1) or mps") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CrdiffError(f"--device {device}: this PyTorch cannot use CUDA (a CPU-only build, or no GPU visible); "
                              "use --device cpu, or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CrdiffError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise CrdiffError(f"--device {device}: MPS is not available here; use --device cpu")
        return
    raise CrdiffError(f"--device {device}: crdiff runs on cpu, cuda or mps")


MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def check_seed(flag: str, seed: int) -> int:
    """Refuse a seed outside the range PyTorch's generators accept."""
    if not MIN_SEED <= seed <= MAX_SEED:
        raise CrdiffError(f"{flag} {seed} is out of range; seeds are integers in {MIN_SEED}..{MAX_SEED}")
    return seed
