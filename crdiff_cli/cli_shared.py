"""What every CLI command shares: the consoles, the help texts of common flags, the one-line error wrapper.

Commands import this module (never :mod:`crdiff_cli.cli`), and :mod:`crdiff_cli.cli` imports the commands
to register them, so the dependency runs one way: cli -> commands -> cli_shared.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from crdiff_cli.errors import CrdiffError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = ("Diffusers pipeline folder, hub id (from the local HF cache), single-file .safetensors, or an "
              "embedded test model: tiny (SD1.5-shaped) or tiny-sdxl.")
RES_HELP = "Target resolution HEIGHTxWIDTH (paper convention), multiples of 8, e.g. 400x560."
RATIOS_HELP = "Pruning ratios DOWN/MID/UP, each in [0, 1), e.g. 0.319/0.240/0.192."
LORA_HELP = ("A LoRA to fuse into the model first: PATH[:SCALE] (scale default 1.0), a diffusers/PEFT or kohya "
             ".safetensors file or a folder holding one (pickled .pt/.bin/.ckpt are refused). Repeatable, fused in "
             "order. Pruning applies to the LoRA-fused weights.")
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


def command(fn):
    """Run a command body, turning user errors into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CrdiffError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; every output is written whole or not at all")
            raise typer.Exit(130) from None
    return wrapper


def start_ranks(device: str):
    """Join the torchrun run if launched by torchrun (see :mod:`crdiff_cli.distributed`), else a single process.

    Every rank but rank 0 prints nothing: its consoles are silenced (a failure is reported by rank 0).
    """
    from crdiff_cli.distributed import start

    def silence():
        out.quiet = err.quiet = True

    return start(device, quiet=silence)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
