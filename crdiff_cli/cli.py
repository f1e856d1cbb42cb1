"""The ``crdiff`` command line: thin Typer commands over the library.

Each command parses and validates its flags (cheap checks first, so bad input fails before a model is
loaded and before anything is written), calls the library, and renders the result with rich. Heavy
modules (torch, diffusers) are imported inside the commands so that ``crdiff --help`` is instant.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

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
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing partial was written")
            raise typer.Exit(130) from None
    return wrapper


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def _version(value: bool):
    if value:
        out.print(f"crdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command()
@command
def prune(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (a diffusers pipeline folder)."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help=RATIOS_HELP),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    res: Optional[str] = typer.Option(None, "--res", help=RES_HELP + " Picks the paper's profile for the model "
                                      "family (nearest resolution, with a warning) when no ratios are given."),
    unet_only: bool = typer.Option(False, "--unet-only", help="Write only the pruned UNet folder."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights dtype: fp32, fp16 or bf16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Prune a UNet block-wise by weight magnitude and save it.

    Targets are the self-attention and feed-forward linears of the down/mid/up transformer blocks. In
    each group the m = floor(n*r) smallest-magnitude weights (and any tied with the m-th) become zero.
    Writes OUT as a diffusers pipeline folder (or just the UNet with --unet-only) and OUT/crdiff_prune.json.
    """
    from crdiff_cli.atomic import check_output
    from crdiff_cli.models import load_model, torch_dtype
    from crdiff_cli.profile_table import choose_ratios
    from crdiff_cli.ratios import Ratios
    from crdiff_cli.render import spec_table
    from crdiff_cli.resolution import Resolution

    resolution = Resolution.parse(res) if res is not None else None
    if ratios is not None:
        Ratios.parse(ratios)
    if profile is not None and ratios is None:
        from crdiff_cli.profile_table import get_profile
        get_profile(profile)
    torch_dtype(dtype)
    check_output(out_dir, overwrite)

    from crdiff_cli.prune_output import write_pruned
    from crdiff_cli.prune_spec import PruneSpec

    with err.status(f"loading {model}"):
        loaded = load_model(model, dtype=dtype)
    choice = choose_ratios(loaded.family, ratios=ratios, profile=profile, resolution=resolution)
    if choice.warning:
        warn(choice.warning)
    with err.status("computing thresholds"):
        spec = PruneSpec.from_unet(loaded.unet, choice.ratios)
    with err.status(f"writing {out_dir}"):
        write_pruned(loaded, spec, out_dir, origin=choice.origin, resolution=str(resolution) if resolution else None,
                     unet_only=unet_only, overwrite=overwrite)
    out.print(spec_table(spec, title=f"{model} ({loaded.family}) pruned with {choice.origin}"))
    out.print(f"wrote {out_dir}")


@app.command("profiles")
@command
def profiles_cmd(family: Optional[str] = typer.Option(None, "--family", help="Only this family: sd15, sd21 or sdxl.")):
    """List the built-in ratio profiles (the paper's Table 6), resolutions HEIGHTxWIDTH."""
    from crdiff_cli.profile_table import builtin_profiles
    from crdiff_cli.render import profiles_table

    rows = [p for p in builtin_profiles() if family is None or p.family == family]
    if not rows:
        raise CrdiffError(f"no profiles for family {family!r}; families are sd15, sd21, sdxl")
    out.print(profiles_table(rows))


def _not_yet(name: str):
    @command
    def stub():
        raise CrdiffError(f"`crdiff {name}` is not implemented yet")
    stub.__doc__ = f"({name}: not implemented yet)"
    return stub


for _name in ("search", "bake", "generate"):
    app.command(_name)(_not_yet(_name))


def main() -> None:
    app(prog_name="crdiff")


if __name__ == "__main__":
    sys.exit(main())
