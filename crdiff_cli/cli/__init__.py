"""The ``crdiff`` command line: thin Typer commands over the library.

Each command parses and validates its flags (cheap checks first, so bad input fails before a model is
loaded and before anything is written), calls the library, and renders the result with rich. Heavy
modules (torch, diffusers) are imported inside the commands so that ``crdiff --help`` is instant.
"""

from __future__ import annotations

import typer

from crdiff_cli import __version__
from crdiff_cli.cli.commands import bake, comfyui, evaluate, generate, prune, search
from crdiff_cli.cli.shared import OneLineErrors, out

# Plain click help (rich_markup_mode=None): two columns, flags without a value shown as bare flags, readable
# at 80 columns; Typer's rich panels spend half the width on empty columns and show flags as `<bool>`.
app = typer.Typer(
    name="crdiff", cls=OneLineErrors, no_args_is_help=True, rich_markup_mode=None, add_completion=False,
    pretty_exceptions_show_locals=False, context_settings={"help_option_names": ["-h", "--help"]},
    help="CR-Diff for diffusers UNets: block-wise magnitude pruning (prune), the paper's ratio search "
         "(search), dual-UNet artifacts (bake), text-to-image (generate) and the paper's evaluation protocol "
         "(evaluate). Resolutions are HEIGHTxWIDTH, as in the paper (400x560 is 400 high, 560 wide).")


def _version(value: bool):
    if value:
        out.print(f"crdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


# Registration order is the order of `crdiff --help` (command modules are light: torch loads when one runs).
# Short help: one whole phrase per command (click would cut the docstring's first sentence mid-word).
app.command(short_help="Prune a UNet block-wise by weight magnitude into a folder.")(prune.prune)
app.command(short_help="Search the best pruning ratios for a resolution (Algorithm 1).")(search.search)
app.command(short_help="Bake ratios and k into one artifact (safetensors or ONNX).")(bake.bake)
app.command(short_help="Text-to-image with CR-Diff (or dense, or from an artifact).")(generate.generate)
app.command(short_help="Compare dense, pruned and CR-Diff images (Tables 7 and 8).")(evaluate.evaluate)
app.command("profiles", short_help="List the built-in ratio profiles (Table 6).")(prune.profiles_cmd)
app.command("comfyui", short_help="Add the CR-Diff nodes to a ComfyUI installation.")(comfyui.comfyui)


def main() -> None:
    from crdiff_cli.runtime.malloc_tuning import reuse_large_blocks

    reuse_large_blocks()  # before torch allocates anything: see malloc_tuning (CPU speed of every UNet call)
    app(prog_name="crdiff")
