"""Hooking the nodes into a ComfyUI installation: one small file in its ``custom_nodes`` folder.

ComfyUI loads every folder in ``custom_nodes`` as a node pack (its ``__init__.py`` exporting
``NODE_CLASS_MAPPINGS``). crdiff installs with pip into ComfyUI's Python; the pack it writes,
``custom_nodes/crdiff/__init__.py``, only re-exports :mod:`crdiff_cli.comfyui.nodes`, so upgrading crdiff
upgrades the nodes. The file carries a marker line: ``--overwrite`` replaces only a pack crdiff wrote.
"""

from __future__ import annotations

from pathlib import Path

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.images import write_file
from crdiff_cli.storage.atomic import make_folder

PACK = "crdiff"
MARKER = "# crdiff ComfyUI node pack, written by `crdiff comfyui`"
STUB = f'''{MARKER}: the nodes live in the installed crdiff package.
"""CR-Diff nodes for ComfyUI (see crdiff's docs/comfyui.md). Remove this folder to uninstall."""

from crdiff_cli.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def custom_nodes_folder(comfyui_dir: Path) -> Path:
    """``comfyui_dir/custom_nodes``, after checking that ``comfyui_dir`` is a ComfyUI folder (or a base directory)."""
    comfyui_dir = Path(comfyui_dir).expanduser()
    if not comfyui_dir.is_dir():
        raise CrdiffError(f"{comfyui_dir} is not a folder; pass the ComfyUI folder (the one with main.py)")
    if not (comfyui_dir / "main.py").is_file() and not (comfyui_dir / "custom_nodes").is_dir():
        raise CrdiffError(f"{comfyui_dir} is not a ComfyUI folder (no main.py, no custom_nodes); pass the folder "
                          "ComfyUI runs from, or its --base-directory")
    return comfyui_dir / "custom_nodes"


def install(comfyui_dir: Path, overwrite: bool = False) -> Path:
    """Write the node pack into ``comfyui_dir/custom_nodes/crdiff``; returns its ``__init__.py``."""
    pack = custom_nodes_folder(comfyui_dir) / PACK
    init = pack / "__init__.py"
    if pack.exists():
        ours = init.is_file() and init.read_text(encoding="utf-8", errors="replace").startswith(MARKER)
        if not ours or any(p.name not in ("__init__.py", "__pycache__") for p in pack.iterdir()):
            raise CrdiffError(f"{pack} exists and is not a pack crdiff wrote; crdiff never replaces what it did not "
                              "create: move it away first")
        if not overwrite:
            raise CrdiffError(f"{init} already exists (crdiff's node pack); pass --overwrite to write it again")
    make_folder(pack, "the node pack")
    write_file(init, STUB.encode("utf-8"))
    return init
