"""What every CLI command shares: the consoles, the help texts of common flags, the one-line error wrapper.

Commands import this module (never :mod:`crdiff_cli.cli`), and :mod:`crdiff_cli.cli` imports the commands
to register them, so the dependency runs one way: cli -> commands -> cli_shared.
"""

from __future__ import annotations

import functools
import inspect
import sys

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from crdiff_cli.errors import CrdiffError, ParameterError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = ("Diffusers pipeline folder, hub id (from the local HF cache), single-file .safetensors, or an "
              "embedded test model: tiny (SD1.5-shaped) or tiny-sdxl.")
RES_HELP = "Target resolution HEIGHTxWIDTH (paper convention), multiples of 8, e.g. 400x560."
RATIOS_HELP = "Pruning ratios DOWN/MID/UP, each in [0, 1), e.g. 0.319/0.240/0.192."
LORA_HELP = ("A LoRA to fuse first: PATH[:SCALE] (default 1.0), a .safetensors file or folder (diffusers/PEFT "
             "or kohya). Repeatable; pruning applies to the fused weights.")
MASKS_HELP = ("Pruned twin: copy (masked copies in one buffer, +23% of an SD1.5 UNet; fastest) or on-the-fly "
              "(no extra memory; slower for small images). Same images either way.")
SCHEDULER_HELP = ("ddim, pndm, euler, euler-a, dpm++, lms, heun, unipc, or for few-step distilled models lcm "
                  "(LCM, LCM-LoRA) and euler-trailing (SDXL-Turbo/Lightning); default: the model's own.")
GUIDANCE_HELP = ("Classifier-free guidance scale; <= 1 turns guidance off (one UNet batch half, as distilled "
                 "few-step models need).")
CONTROLNET_HELP = "A ControlNet (diffusers folder or hub id, safetensors weights) matching the model; needs --control-image."
CONTROL_IMAGE_HELP = "The ControlNet's conditioning image (e.g. an edge map), resized to --res."
CONTROL_SCALE_HELP = "ControlNet conditioning scale (its residuals are multiplied by it), >= 0."
INIT_IMAGE_HELP = "img2img: start from this image (resized to --res) instead of pure noise."
STRENGTH_HELP = "img2img: how much of the init image is re-noised, in (0, 1]; 1 ignores it (default 0.8)."
MASK_IMAGE_HELP = "Inpainting (with --init-image): white pixels are repainted, black kept; resized to --res."
PROFILE_HELP = "A built-in profile (see `crdiff profiles`, e.g. sd15@400x560) or a profile JSON file."

# Options that generate and evaluate declare alike (Typer reads these as the parameters' defaults).
LORA_OPTION = typer.Option(None, "--lora", metavar="PATH[:SCALE]", help=LORA_HELP)
CONTROLNET_OPTION = typer.Option(None, "--controlnet", help=CONTROLNET_HELP)
CONTROL_IMAGE_OPTION = typer.Option(None, "--control-image", help=CONTROL_IMAGE_HELP)
CONTROL_SCALE_OPTION = typer.Option(1.0, "--control-scale", help=CONTROL_SCALE_HELP)
INIT_IMAGE_OPTION = typer.Option(None, "--init-image", help=INIT_IMAGE_HELP)
STRENGTH_OPTION = typer.Option(None, "--strength", help=STRENGTH_HELP)
MASK_IMAGE_OPTION = typer.Option(None, "--mask-image", help=MASK_IMAGE_HELP)
POA_INTERVAL_OPTION = typer.Option(None, "--poa-interval", metavar="START:STOP", help=(
    "Both passes only in this part of the steps (fractions from the noise end; 0:0.3 = first 30%). Default "
    "0:1 (all)."))
POA_OUTSIDE_OPTION = typer.Option(None, "--poa-outside", metavar="dense|pruned", help=(
    "The one pass outside --poa-interval (default dense)."))
POA_REFRESH_OPTION = typer.Option(None, "--poa-refresh", metavar="N", help=(
    "Both passes every N-th step; between, one pass + the last difference. Default 1."))


def poa_policy(interval: str | None, outside: str | None, refresh: int | None, default=None):
    """The POA policy the ``--poa-*`` flags ask for; flags left out keep ``default``'s (full CR-Diff if None)."""
    from crdiff_cli.dual.poa_policy import PoaPolicy

    base = default or PoaPolicy()
    return PoaPolicy.parse(base.interval_text() if interval is None else interval,
                           base.outside if outside is None else outside, base.refresh if refresh is None else refresh)


def command(fn):
    """Run a command body, turning user errors into one line on stderr and exit code 2.

    Every number flag is checked first: floats finite (Typer accepts ``nan`` and ``inf``), integers within
    what their use accepts (:func:`_check_numbers`). A library error about
    a parameter (:class:`ParameterError`) is shown with the command's flag for it: ``k`` becomes ``--k``.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_numbers(fn, kwargs)
            return fn(*args, **kwargs)
        except CrdiffError as exc:
            message = exc.named(lambda name: _flag(fn, name)) if isinstance(exc, ParameterError) else str(exc)
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; every output is written whole or not at all")
            raise typer.Exit(130) from None
    return wrapper


def start_ranks(device: str):
    """Join the torchrun run if launched by torchrun (see :mod:`crdiff_cli.runtime.distributed`), else a single process.

    Every rank but rank 0 prints nothing: its consoles are silenced (a failure is reported by rank 0).
    """
    from crdiff_cli.runtime.distributed import start

    def silence():
        out.quiet = err.quiet = True

    return start(device, quiet=silence)
MAX_COUNT = 2**31 - 1  # any count or size flag (steps, images, iterations, ...) beyond this is a typo


def _check_numbers(fn, kwargs: dict) -> None:
    """Floats finite; ``--seed`` (and the last seed ``--seed + --num-images - 1``) within what PyTorch's
    generators take; every other integer flag within a 32-bit count. Typer accepts any Python int, and a
    value out of range would otherwise surface as a traceback after the model loaded."""
    from crdiff_cli.validation import check_finite, check_seed

    for name, value in kwargs.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            check_finite(name, value)
        elif isinstance(value, int) and name == "seed":
            check_seed(_flag(fn, name), value)
            if isinstance(kwargs.get("num_images"), int) and kwargs["num_images"] > 1:
                check_seed(f"{_flag(fn, name)} + --num-images - 1 =", value + kwargs["num_images"] - 1)
        elif isinstance(value, int) and not -MAX_COUNT <= value <= MAX_COUNT:
            raise CrdiffError(f"{_flag(fn, name)} {value} is out of range; use a value below {MAX_COUNT + 1:,}")


# Library parameters whose command parameter has another name.
_COMMAND_NAMES = {"resolution": "res"}


def _flag(fn, name: str) -> str:
    """The ``--long`` flag of parameter ``name`` (its Typer option's first long declaration; a library
    parameter the command does not have is shown as ``--name-with-dashes``)."""
    name = _COMMAND_NAMES.get(name, name)
    parameter = inspect.signature(fn).parameters.get(name)
    decls = getattr(parameter.default, "param_decls", None) or () if parameter is not None else ()
    return next((d.split("/")[0] for d in decls if d.startswith("--")), "--" + name.replace("_", "-"))


def plural(count: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


class OneLineErrors(TyperGroup):
    """The app's click group: a usage error (unknown flag, bad number) is one line and exit code 2.

    Typer prints click's usage errors as a usage line, a hint and a 3-line box; crdiff's promise for
    bad input is one line, ``error: <what>; <fix>``, wherever the error comes from.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors (Typer vendors click)
            if not hasattr(exc, "format_message"):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # `crdiff` alone: its message is the help
                exc.show()
            else:
                err.print(f"[bold red]error:[/] {escape(usage_error_line(exc))}", highlight=False)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_error_line(exc) -> str:
    """``<click's message>; see `crdiff COMMAND --help``` on one line."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "crdiff --help"
    return f"{message.rstrip('.')}; see `{where}`"
