"""`crdiff prune` and `crdiff profiles`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crdiff_cli.cli.shared import LORA_HELP, MODEL_HELP, PROFILE_HELP, RATIOS_HELP, RES_HELP, command, err, out, warn
from crdiff_cli.errors import CrdiffError


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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous crdiff prune output in --out (a "
                                   "folder holding anything crdiff did not write is refused)."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", metavar="PATH[:SCALE]", help=LORA_HELP),
):
    """Prune a UNet block-wise by weight magnitude and save it.

    Targets are the self-attention and feed-forward linears of the down/mid/up transformer blocks. In
    each group the m = floor(n*r) smallest-magnitude weights (and any tied with the m-th) become zero.
    With --lora, the LoRA-fused weights are pruned (and the folder holds the fused text encoders too).
    Writes OUT as a diffusers pipeline folder (or just the UNet with --unet-only) and OUT/crdiff_prune.json.
    """
    from crdiff_cli.cli.render import spec_table
    from crdiff_cli.pipelines.loading import torch_dtype
    from crdiff_cli.pipelines.lora import prepare_loras
    from crdiff_cli.pipelines.pruned_folder import PRUNED
    from crdiff_cli.pruning.profile_table import check_ratio_source
    from crdiff_cli.pruning.resolution import Resolution
    from crdiff_cli.storage.atomic import check_output

    resolution = Resolution.parse(res) if res is not None else None
    check_ratio_source(ratios=ratios, profile=profile, resolution=resolution)
    torch_dtype(dtype)
    check_output(out_dir, overwrite, PRUNED)
    loras = prepare_loras(lora, model)

    from crdiff_cli.pipelines.prepare import choose_spec, load_prepared
    from crdiff_cli.pipelines.pruned_folder import write_pruned

    with err.status(f"loading {model}"):
        loaded = load_prepared(model, dtype=dtype, loras=loras)
    with err.status("computing thresholds"):
        choice, spec = choose_spec(loaded, ratios=ratios, profile=profile, resolution=resolution, warn=warn)
    with err.status(f"writing {out_dir}"):
        write_pruned(loaded, spec, out_dir, origin=choice.origin, resolution=str(resolution) if resolution else None,
                     unet_only=unet_only, overwrite=overwrite, loras=[x.label for x in loras])
    out.print(spec_table(spec, title=f"{model} ({loaded.family}) pruned with {choice.origin}"))
    out.print(f"wrote {out_dir}")


@command
def profiles_cmd(family: Optional[str] = typer.Option(None, "--family", help="Only this family: sd15, sd21 or sdxl.")):
    """List the built-in ratio profiles (the paper's Table 6), resolutions HEIGHTxWIDTH."""
    from crdiff_cli.cli.render import profiles_table
    from crdiff_cli.pruning.profile_table import builtin_profiles

    rows = [p for p in builtin_profiles() if family is None or p.family == family]
    if not rows:
        raise CrdiffError(f"no profiles for family {family!r}; families are sd15, sd21, sdxl")
    out.print(profiles_table(rows))
