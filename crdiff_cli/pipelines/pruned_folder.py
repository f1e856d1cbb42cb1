"""Writing a pruned model: a diffusers folder whose UNet is pruned, plus ``crdiff_prune.json``.

The record lists every file crdiff wrote into the folder, so that ``--overwrite`` replaces a folder only
while it holds nothing else: a file a user put there since is never deleted (the folder is refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from crdiff_cli.pipelines.loading import PRUNE_RECORD, LoadedModel
from crdiff_cli.storage.atomic import OutputKind, atomic_path, folder_files, lists_every_file

if TYPE_CHECKING:
    from crdiff_cli.pruning.spec import PruneSpec

RECORD_FORMAT = "crdiff-prune/1"


def is_prune_output(folder: Path) -> bool:
    """A folder ``crdiff prune`` wrote that holds only what it wrote (its record lists those files)."""
    return lists_every_file(folder, PRUNE_RECORD, "crdiff-prune/")


PRUNED = OutputKind("pruned model folder", f"{PRUNE_RECORD} listing every file in it; a folder from a crdiff that did "
                    "not list its files is refused too, remove it yourself", is_prune_output, folder=True)


def prune_record(loaded: LoadedModel, spec: PruneSpec, origin: str, resolution: str | None,
                 loras: list[str] | None = None) -> dict:
    """What ``crdiff_prune.json`` holds: where the ratios came from, the LoRAs fused in (``path:scale``, in
    order) and, per group, the exact outcome."""
    return {"format": RECORD_FORMAT, "model": loaded.source, "family": loaded.family, "resolution": resolution,
            "loras": loras or [], "ratios_origin": origin, **spec.to_dict()}


def write_pruned(loaded: LoadedModel, spec: PruneSpec, out: Path, *, origin: str, resolution: str | None = None,
                 unet_only: bool = False, overwrite: bool = False, loras: list[str] | None = None) -> dict:
    """Prune ``loaded``'s UNet in place and save it (whole pipeline, or just the UNet) to ``out`` atomically."""
    from crdiff_cli.pruning.spec import prune_

    prune_(loaded.unet, spec)
    record = prune_record(loaded, spec, origin, resolution, loras)
    with atomic_path(out, overwrite, kind=PRUNED, directory=True) as tmp:
        target = loaded.unet if unet_only else loaded.pipe
        target.save_pretrained(tmp, safe_serialization=True)
        record["files"] = sorted(folder_files(tmp) | {PRUNE_RECORD})
        (Path(tmp) / PRUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
