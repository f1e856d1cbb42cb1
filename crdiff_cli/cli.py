"""The ``crdiff`` command line: thin Typer commands over the library.

Each command parses and validates its flags (cheap checks first, so bad input fails before a model is
loaded and before anything is written), calls the library, and renders the result with rich. Heavy
modules (torch, diffusers) are imported inside the commands so that ``crdiff --help`` is instant.
"""

from __future__ import annotations

import typer

from crdiff_cli import __version__
from crdiff_cli.cli_shared import out
from crdiff_cli.commands import bake, generate, prune, search

app = typer.Typer(
    name="crdiff", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
    pretty_exceptions_show_locals=False,
    help="CR-Diff for diffusers UNets: block-wise magnitude pruning ([bold]prune[/]), the paper's ratio "
         "search ([bold]search[/]), dual-UNet artifacts ([bold]bake[/]) and text-to-image ([bold]generate[/]). "
         "Resolutions are HEIGHTxWIDTH, as in the paper (400x560 is 400 high, 560 wide).")


def _version(value: bool):
    if value:
        out.print(f"crdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


# Registration order is the order of `crdiff --help` (command modules are light: torch loads when one runs).
app.command()(prune.prune)
app.command()(search.search)
app.command()(bake.bake)
app.command()(generate.generate)
app.command("profiles")(prune.profiles_cmd)


def main() -> None:
    from crdiff_cli.malloc_tuning import reuse_large_blocks

    reuse_large_blocks()  # before torch allocates anything: see malloc_tuning (CPU speed of every UNet call)
    app(prog_name="crdiff")
