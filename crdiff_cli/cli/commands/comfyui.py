"""`crdiff comfyui`: hook crdiff's nodes into a ComfyUI installation."""

from __future__ import annotations

from pathlib import Path

import typer

from crdiff_cli.cli.shared import command, out


@command
def comfyui(
    comfyui_dir: Path = typer.Argument(..., metavar="COMFYUI_DIR", help="The ComfyUI folder (with main.py), or the "
                                       "--base-directory it runs with."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write the pack again over the one crdiff wrote."),
):
    """Add the CR-Diff nodes to ComfyUI: writes COMFYUI_DIR/custom_nodes/crdiff/__init__.py, which loads them
    from this crdiff. Run it with the Python ComfyUI runs with (pip install crdiff there first), then restart
    ComfyUI; the nodes are under model_patches/crdiff. Remove that folder to uninstall (docs/comfyui.md)."""
    from crdiff_cli.comfyui.install import install

    init = install(comfyui_dir, overwrite=overwrite)
    out.print(f"wrote {init}; restart ComfyUI to load the nodes 'CR-Diff (cross-resolution)' and "
              "'CR-Diff from artifact' (category model_patches/crdiff)")
