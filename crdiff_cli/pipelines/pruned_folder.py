"""Writing a pruned model: a diffusers folder whose UNet is pruned, plus ``crdiff_prune.json``."""

from __future__ import annotations

import json
from pathlib import Path

from crdiff_cli.storage.atomic import OutputKind, atomic_path, json_marker
from crdiff_cli.pipelines.loading import PRUNE_RECORD, LoadedModel
from crdiff_cli.pruning.spec import PruneSpec, prune_

RECORD_FORMAT = "crdiff-prune/1"
PRUNED = OutputKind("pruned model folder", PRUNE_RECORD, lambda path: json_marker(path / PRUNE_RECORD, "crdiff-prune/"),
                    folder=True)


def prune_record(loaded: LoadedModel, spec: PruneSpec, origin: str, resolution: str | None,
                 loras: list[str] | None = None) -> dict:
    """What ``crdiff_prune.json`` holds: where the ratios came from, the LoRAs fused in (``path:scale``, in
    order) and, per group, the exact outcome."""
    return {"format": RECORD_FORMAT, "model": loaded.source, "family": loaded.family, "resolution": resolution,
            "loras": loras or [], "ratios_origin": origin, **spec.to_dict()}


def write_pruned(loaded: LoadedModel, spec: PruneSpec, out: Path, *, origin: str, resolution: str | None = None,
                 unet_only: bool = False, overwrite: bool = False, loras: list[str] | None = None) -> dict:
    """Prune ``loaded``'s UNet in place and save it (whole pipeline, or just the UNet) to ``out`` atomically."""
    prune_(loaded.unet, spec)
    record = prune_record(loaded, spec, origin, resolution, loras)
    with atomic_path(out, overwrite, kind=PRUNED, directory=True) as tmp:
        target = loaded.unet if unet_only else loaded.pipe
        target.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / PRUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
