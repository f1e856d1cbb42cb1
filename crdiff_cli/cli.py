"""The ``crdiff`` command line: thin Typer commands over the library.

Each command parses and validates its flags (cheap checks first, so bad input fails before a model is
loaded and before anything is written), calls the library, and renders the result with rich. Heavy
modules (torch, diffusers) are imported inside the commands so that ``crdiff --help`` is instant.
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from crdiff_cli import __version__
from crdiff_cli.errors import CrdiffError

app = typer.Typer(
    name="crdiff", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
    pretty_exceptions_show_locals=False,
    help="CR-Diff for diffusers UNets: block-wise magnitude pruning ([bold]prune[/]), the paper's ratio "
         "search ([bold]search[/]), dual-UNet artifacts ([bold]bake[/]) and text-to-image ([bold]generate[/]). "
         "Resolutions are HEIGHTxWIDTH, as in the paper (400x560 is 400 high, 560 wide).")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = ("Diffusers pipeline folder, hub id (from the local HF cache), single-file .safetensors, or an "
              "embedded test model: tiny (SD1.5-shaped) or tiny-sdxl.")
RES_HELP = "Target resolution HEIGHTxWIDTH (paper convention), multiples of 8, e.g. 400x560."
RATIOS_HELP = "Pruning ratios DOWN/MID/UP, each in [0, 1), e.g. 0.319/0.240/0.192."
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


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def _version(value: bool):
    if value:
        out.print(f"crdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main() -> None:
    app(prog_name="crdiff")


# Register the commands (light modules: they import torch/diffusers only when run).
from crdiff_cli.commands import prune, search, bake, generate  # noqa: E402,F401,I001  (registration order = help order)
