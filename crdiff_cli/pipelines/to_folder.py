"""A generate run into a folder: every (prompt, seed) made, encoded and written, with a manifest.

This is what ``crdiff generate`` does after loading; the same loop serves one process or many ranks.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pipelines.images import (ImageRecord, compare_grid, image_params, png_bytes, save_png, write_file,
                                         write_manifest)


def generate_to_folder(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings, out_dir: Path, *,
                       model_info: dict, dual=None, compare: bool = False,
                       on_step: Callable[[], None] | None = None, on_image: Callable[[], None] | None = None,
                       ranks=None, render: Callable[[str, int], object] | None = None) -> list[ImageRecord]:
    """Generate every (prompt, seed) into ``out_dir``; with ``compare`` also the dense image and a grid.

    The caller applies ``settings.scheduler`` first (:func:`~crdiff_cli.pipelines.schedulers.set_scheduler`).
    ``dual`` is the pipeline's DualUNet (None for a dense run, or for an ONNX artifact: ``model_info["mode"]``
    names the variant); the dense image of a comparison is made with the same DualUNet at k = 0 and full POA,
    which is the dense model bit for bit.

    Each (prompt, seed) is one work item, encoded to PNG bytes where it is made; with ``ranks`` (a
    :class:`crdiff_cli.runtime.distributed.Ranks` under torchrun) the items are split across ranks and rank 0
    alone writes every file, in item order, so the files are the ones a single process writes.
    Records (and ``on_image`` calls) are on rank 0; the other ranks return an empty list. ``render(prompt, seed)``
    makes an image another way than ``pipe`` (the torch-free ONNX runner; ``pipe`` is then None).
    """
    from crdiff_cli.runtime.distributed import SINGLE

    ranks = ranks or SINGLE
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    variant = model_info.get("mode", "dense" if dual is None else "crdiff")  # an ONNX artifact has no DualUNet
    items = [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]

    def encoded(image, index, prompt, seed, kind, info) -> tuple[bytes, ImageRecord]:
        name = f"{index}_{seed}{'_dense' if kind == 'dense' and compare else ''}.png"
        params = image_params(prompt, seed, settings, info)
        return png_bytes(image, params), ImageRecord(name, index, prompt, seed, kind, params)

    trace = getattr(getattr(getattr(pipe, "unet", None), "poa", None), "trace", None)  # generate --trace-poa
    render = render or (lambda prompt, seed: generate_image(pipe, prompt, seed, settings, on_step))

    def make(item) -> list[tuple[bytes, ImageRecord]]:
        index, prompt, seed = item
        if trace is not None:
            trace.label = f"{index}_{seed}"
        made = [encoded(render(prompt, seed), index, prompt, seed, variant, model_info)]
        if compare and dual is not None:  # k = 0 under full POA: the dense model (a policy may run pruned passes)
            k, policy = dual.k, dual.poa.policy
            dual.k, dual.poa.policy = 0.0, PoaPolicy()
            try:
                dense = generate_image(pipe, prompt, seed, settings, on_step)
            finally:
                dual.k, dual.poa.policy = k, policy
            made.append(encoded(dense, index, prompt, seed, "dense", {**model_info, "mode": "dense", "k": 0.0}))
        return made

    pairs = []

    def write(round_items, results) -> None:
        from PIL import Image

        for (index, prompt, seed), made in zip(round_items, results):
            for data, record in made:
                write_file(out_dir / record.file, data)
                records.append(record)
                if on_image:
                    on_image()
            if len(made) == 2:
                image, dense = (Image.open(io.BytesIO(data)) for data, _ in made)
                pairs.append((seed, dense, image))
                if seed == seeds[-1]:
                    grid = compare_grid(pairs, f"{prompt}  (k={model_info.get('k')}, ratios {model_info.get('ratios')})")
                    save_png(grid, out_dir / f"compare_{index}.png", {"prompt": prompt, "seeds": seeds, **model_info})
                    pairs.clear()

    ranks.map(items, lambda batch: [make(item) for item in batch], on_results=write)
    if ranks.is_main:
        write_manifest(out_dir, records, {"model": model_info, "settings": {
            "steps": settings.steps, "guidance": settings.guidance, "negative_prompt": settings.negative_prompt,
            "scheduler": settings.scheduler, "resolution": str(settings.resolution)}, "seeds": seeds})
    return records
