"""`crdiff evaluate`: the paper's Table 7 / Table 8 protocol (dense, pruned, CR-Diff) on the user's model.

Structure (the batches are split across ranks under torchrun, results gathered on rank 0):

1. :func:`work_items` — the deterministic, ordered list of :class:`WorkItem` (resolution, variant,
   prompt index, seed); :func:`batches` cuts it into fixed batches (never across a resolution or variant),
   so a batch holds the same images whatever was already done.
2. :meth:`Evaluation.produce` — generates one batch (the `crdiff generate` code), encodes its PNGs and
   scores them with every per-image metric; returns the PNG bytes and the score records.
3. :func:`run` — the driver: skips batches whose records are all in ``scores.jsonl`` (and whose images
   exist); deals the others out to the ranks (:meth:`crdiff_cli.runtime.distributed.Ranks.map`, one batch per
   rank per round); rank 0 writes each batch's PNGs atomically, then appends and fsyncs its records, in
   batch order. A batch is made and scored whole on one rank, so its pixels and scores (which may depend
   on the batch's composition) are those of one process, whatever the number of ranks.

Each variant of a (prompt, seed) has the same seed and settings. On CPU every image is computed on its
own (:func:`model_calls`), so whatever the batch size an image is, bit for bit, what `crdiff generate`
writes with ``--dense``, ``--k 1`` or ``--k K`` (same pixels, same PNG text), and its scores are those of
batch size 1; on a GPU a batch shares its calls (faster, rounded differently from batch size 1).
:func:`finalize` then computes FID, the summaries and the paired comparisons from the records.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from crdiff_cli import defaults
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError, ParameterError
from crdiff_cli.pruning.resolution import Resolution

VARIANTS = ("dense", "pruned", "crdiff")
SCORES = "scores.jsonl"
REPORT = "report.html"
JOURNAL_KIND = "evaluation"


@dataclass(frozen=True)
class WorkItem:
    """One image to make and score."""

    resolution: Resolution
    variant: str
    prompt_index: int
    seed: int

    @property
    def image(self) -> str:
        """Path of the PNG relative to the output folder."""
        return f"images/{self.resolution}/{variant_folder(self.variant)}/{self.prompt_index}_{self.seed}.png"

    def key(self, metric: str | None) -> tuple:
        return (str(self.resolution), self.variant, self.prompt_index, self.seed, metric)


def work_items(resolutions: list[Resolution], variants: list[str], num_prompts: int, seeds: list[int]) -> list[WorkItem]:
    """Every image, ordered by resolution, variant, prompt, seed."""
    return [WorkItem(res, variant, index, seed) for res in resolutions for variant in variants
            for index in range(num_prompts) for seed in seeds]


def batches(items: list[WorkItem], size: int) -> list[list[WorkItem]]:
    """Consecutive runs of ``size`` items of one (resolution, variant): fixed, whatever is already done."""
    out: list[list[WorkItem]] = []
    for item in items:
        last = out[-1] if out else None
        if last and len(last) < size and (last[0].resolution, last[0].variant) == (item.resolution, item.variant):
            last.append(item)
        else:
            out.append([item])
    return out


def parse_variants(text: str) -> list[str]:
    """The variants ``--variants`` names: dense, pruned, crdiff, and CR-Diff under a POA policy
    (``crdiff@0:0.3``, ``crdiff/refresh4``; see :meth:`~crdiff_cli.dual.poa_policy.PoaPolicy.from_label`),
    written canonically, the fixed ones first, the policies in the order given."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS and not v.startswith("crdiff")]
    if unknown or not variants:
        raise CrdiffError(f"--variants {text!r}: choose from {', '.join(VARIANTS)} or crdiff@START:STOP, "
                          "crdiff/refreshN (comma-separated)")
    variants = [v if v in VARIANTS else _canonical_policy_variant(v, text) for v in variants]
    if len(set(variants)) != len(variants):
        raise CrdiffError(f"--variants {text!r} names a variant twice")
    return [v for v in VARIANTS if v in variants] + [v for v in variants if v not in VARIANTS]


def _canonical_policy_variant(variant: str, text: str) -> str:
    """``crdiff`` plus the canonical label of the policy ``variant`` names; a bad one is refused as part of
    ``--variants`` (the policy's own error names the generate flag, which evaluate does not have)."""
    try:
        return "crdiff" + variant_policy(variant).label()
    except ParameterError as exc:
        raise CrdiffError(f"--variants {text!r}: {variant} has a bad POA policy: its {exc.param.replace('_', '-')} "
                          f"{exc.value} {exc.problem}") from None


def variant_policy(variant: str) -> PoaPolicy:
    """The POA policy of a CR-Diff variant (full POA for ``crdiff``, dense and pruned)."""
    return PoaPolicy.from_label(variant.removeprefix("crdiff")) if variant.startswith("crdiff") else PoaPolicy()


def variant_folder(variant: str) -> str:
    """A file-name-safe folder for a variant's images (``crdiff@0:0.3/refresh4`` -> ``crdiff@0-0.3_refresh4``)."""
    return variant.replace(":", "-").replace("/", "_")


def read_prompt_source(path: Path, coco_sample: str | None = None, reference_images: Path | None = None) -> list[str]:
    """Prompts from a text file (one per line) or a JSON file: an MS-COCO captions JSON
    (``captions_val2014.json``) sampled by ``coco_sample`` (default ``paper``: the authors' 5K sample; ``first``:
    one caption per image, images by ascending id), or a saved prompt set (:mod:`crdiff_cli.evaluation.coco`).
    """
    from crdiff_cli.pipelines.prompts import read_prompts

    if not is_json_source(path):
        _no_sampler(coco_sample)
        return read_prompts(path)
    from crdiff_cli.evaluation.coco import prompt_set

    return prompt_set(path, coco_sample, reference_images).prompts


def _no_sampler(coco_sample: str | None) -> None:
    if coco_sample is not None:
        raise ParameterError("coco_sample", coco_sample, "applies to an MS-COCO captions JSON (--prompts FILE.json)")


def is_json_source(path: Path) -> bool:
    """Whether ``--prompts`` names a JSON file (COCO captions or a saved prompt set) rather than a text file."""
    return Path(path).suffix.lower() == ".json"


@dataclass(frozen=True)
class PromptSource:
    """The prompts of a run and, from a COCO JSON, the prompt set they are (``full``: before ``--limit``)."""

    prompts: list[str]
    full: object | None = None  # crdiff_cli.evaluation.coco.PromptSet
    used: object | None = None

    @cached_property
    def reference_files(self) -> list[Path] | None:
        """FID's real images when they are the prompt set's own (``paper``); None: the whole folder."""
        return None if self.used is None else self.used.reference_files()

    @property
    def sampler_uses_reference(self) -> bool:
        """Whether ``--reference-images`` decided the prompts (the ``paper`` sampler skips missing images)."""
        return self.full is not None and self.full.sampler == "paper" and not self.full.saved

    @property
    def warning(self) -> str | None:
        full = self.full
        if full is None or not full.missing or full.saved:
            return None
        return (f"{len(full.missing):,} of the {full.size:,} sampled images are not in {full.reference_images} "
                f"(e.g. {full.missing[0]}): their prompts are skipped, as the authors' script skips them "
                f"({len(full.pairs):,} prompts remain)")

    def identity(self) -> dict | None:
        return None if self.used is None else self.used.summary()


def prompt_source(*, prompt: str | None, prompts_file: Path | None, coco_sample: str | None = None,
                  reference_images: Path | None = None, limit: int | None = None) -> PromptSource:
    """The run's prompts from ``--prompt`` or ``--prompts`` (text, COCO captions JSON or saved prompt set),
    cut to ``limit``; checked, nothing loaded."""
    from crdiff_cli.validation import check_prompt

    if (prompt is None) == (prompts_file is None):
        raise CrdiffError("pass exactly one of --prompt TEXT or --prompts FILE")
    if limit is not None and limit < 1:
        raise ParameterError("limit", limit, "must be at least 1")
    if prompts_file is None:
        _no_sampler(coco_sample)
        return PromptSource([check_prompt("--prompt", prompt)])
    if not is_json_source(prompts_file):
        return PromptSource(read_prompt_source(prompts_file, coco_sample)[:limit])
    from crdiff_cli.evaluation.coco import prompt_set

    full = prompt_set(prompts_file, coco_sample, reference_images)
    used = full.head(limit)
    return PromptSource(used.prompts, full, used)


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


class Evaluation:
    """The loaded model (one DualUNet for all variants and resolutions) and metric models, loaded once."""

    def __init__(self, loaded, *, model_info: dict, ratio_choices: dict, settings: dict, prompts: list[str],
                 k: float, metrics: list, out_dir: Path, masks: str = defaults.MASKS):
        from crdiff_cli.dual.apply import apply_crdiff
        from crdiff_cli.pipelines.schedulers import set_scheduler
        from crdiff_cli.pruning.spec import PruneSpec

        self.pipe = loaded.pipe
        self.model_info, self.choices, self.settings = model_info, ratio_choices, settings
        self.prompts, self.k, self.metrics, self.out_dir, self.masks = prompts, k, metrics, out_dir, masks
        self.specs = {res: PruneSpec.from_unet(loaded.unet, choice.ratios) for res, choice in ratio_choices.items()}
        self.dual = apply_crdiff(loaded.pipe, next(iter(self.specs.values())), k=k, masks=masks)
        self.seconds: dict[tuple[str, str], list[float]] = {}  # wall seconds per image made here, by (res, variant)
        set_scheduler(self.pipe, next(iter(settings.values())).scheduler)

    def variant_k(self, variant: str) -> float:
        return {"dense": 0.0, "pruned": 1.0}.get(variant, self.k)

    def image_info(self, resolution: Resolution, variant: str) -> dict:
        """The PNG's model fields, exactly as `crdiff generate --dense / --k 1 / --k K` writes them."""
        from crdiff_cli.pipelines.images import crdiff_info

        if variant == "dense":
            return {**self.model_info, "mode": "dense", "k": 0.0}
        return {**self.model_info, **crdiff_info(self.choices[resolution], self.specs[resolution],
                                                 self.variant_k(variant), self.masks, variant_policy(variant))}

    def produce(self, batch: list[WorkItem], on_step: Callable[[], None] | None = None) -> tuple[list, list[dict]]:
        """Generate and score one batch: ``([(image path, PNG bytes)], one record per (item, per-image metric))``."""
        from crdiff_cli.pipelines.generation import generate_images
        from crdiff_cli.pipelines.images import image_params, png_bytes

        first = batch[0]
        settings = self.settings[first.resolution]
        self.dual.set_spec(self.specs[first.resolution])
        self.dual.k = self.variant_k(first.variant)
        self.dual.poa.policy = variant_policy(first.variant)
        prompts = [self.prompts[item.prompt_index] for item in batch]
        images, scores, passes = [], {m.spec.name: [] for m in self.metrics}, []
        timed = self.seconds.setdefault((str(first.resolution), first.variant), [])
        for call in model_calls(batch, self.pipe.device.type):
            call_prompts = [self.prompts[item.prompt_index] for item in call]
            start, passes_before = time.perf_counter(), self.dual.passes
            call_images = generate_images(self.pipe, call_prompts, [item.seed for item in call], settings, on_step)
            timed += [(time.perf_counter() - start) / len(call)] * len(call)
            passes += [self.dual.passes - passes_before] * len(call)  # a batched call's passes serve every image
            for metric in self.metrics:
                scores[metric.spec.name].extend(metric.score(call_images, call_prompts))
            images.extend(call_images)
        info = self.image_info(first.resolution, first.variant)
        files = [(item.image, png_bytes(image, image_params(prompt, item.seed, settings, info)))
                 for item, image, prompt in zip(batch, images, prompts)]
        records = []
        for i, item in enumerate(batch):
            base = {"resolution": str(item.resolution), "variant": item.variant, "prompt_index": item.prompt_index,
                    "seed": item.seed, "image": item.image, "unet_passes": passes[i]}
            if not scores:  # FID only: the record says the image is done
                records.append({**base, "metric": None, "score": None})
            records.extend({**base, "metric": name, "score": values[i]} for name, values in scores.items())
        return files, records


def model_calls(batch: list[WorkItem], device_type: str) -> list[list[WorkItem]]:
    """The pipeline and metric calls a batch is computed in: the whole batch at once on an accelerator,
    where batching pays; one image per call on CPU, whose kernels round differently with the batch size,
    so that on CPU an image and its scores are bit for bit the same whatever ``--batch-size`` is."""
    return [batch] if device_type != "cpu" else [[item] for item in batch]


def record_key(record: dict) -> tuple:
    return (record["resolution"], record["variant"], record["prompt_index"], record["seed"], record["metric"])


def pending(items: list[WorkItem], batch_size: int, metric_names: list[str | None], records: list[dict],
            out_dir: Path) -> list[list[WorkItem]]:
    """The batches with a record or an image missing (a kill loses at most the batch in flight)."""
    done = {record_key(r) for r in records}
    return [batch for batch in batches(items, batch_size)
            if not all(item.key(m) in done for item in batch for m in metric_names)
            or not all((out_dir / item.image).is_file() for item in batch)]


def run(evaluation: Evaluation, todo: list[list[WorkItem]], journal, records: list[dict], *, ranks=None,
        on_step: Callable[[], None] | None = None, on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """Produce every pending batch, appending its new records (durably) to ``journal`` and ``records``.

    With ``ranks`` (under torchrun) each rank produces its share of every round and rank 0 — the only one
    with a ``journal`` — writes the images and records in batch order (``on_batch`` is called there).
    A failed rank raises :class:`crdiff_cli.runtime.distributed.RankFailure` once the finished rounds are journaled.
    """
    from crdiff_cli.pipelines.images import write_file
    from crdiff_cli.runtime.distributed import SINGLE

    done = {record_key(r) for r in records}

    def write(round_batches, results) -> None:
        for batch, (files, new_records) in zip(round_batches, results):
            for image, data in files:  # the images first: a record promises its image exists
                path = evaluation.out_dir / image
                path.parent.mkdir(parents=True, exist_ok=True)
                write_file(path, data)
            for record in new_records:
                if record_key(record) not in done:
                    journal.append(record)
                    records.append(record)
                    done.add(record_key(record))
            if on_batch:
                on_batch(len(batch))

    (ranks or SINGLE).map(todo, lambda share: [evaluation.produce(batch, on_step) for batch in share],
                          on_results=write)
    return records


@dataclass
class Session:
    """A started evaluation: models loaded, journal open, the records so far (journal and records: rank 0)."""

    evaluation: Evaluation
    journal: object | None
    records: list[dict]
    specs: list
    fid: object | None
    identity: dict
    out_dir: Path
    ranks: object

    @property
    def metric_names(self) -> list[str | None]:
        return [s.name for s in self.specs if s.per_image] or [None]

    def pending(self, items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
        """The pending batches, as rank 0 (which holds the records and the images) sees them, on every rank."""
        return self.ranks.on_main(lambda: pending(items, batch_size, self.metric_names, self.records, self.out_dir))

    def run(self, todo: list[list[WorkItem]], on_batch: Callable[[int], None] | None = None) -> None:
        try:
            run(self.evaluation, todo, self.journal, self.records, ranks=self.ranks, on_batch=on_batch)
        finally:
            if self.journal is not None:
                self.journal.close()


def start(*, model: str, identity: dict, settings: dict, prompts: list[str], specs, reference_images: Path | None,
          k: float, ratios: str | None, profile: str | None, dtype: str, device: str, out_dir: Path, resume: bool,
          overwrite: bool, warn: Callable[[str], None], ranks=None, loras=(), inputs=None,
          reference_files: list[Path] | None = None, fid_resize: int | None = None) -> Session:
    """Load the model and metric models, choose each resolution's ratios, open ``scores.jsonl``.

    Under torchrun (``ranks``) every rank loads the models onto its own device; rank 0 alone loads the
    FID model (FID is computed from the written images in :func:`finish`) and opens the journal.
    ``loras`` (:mod:`crdiff_cli.pipelines.lora`) are fused right after loading; ``inputs``
    (:class:`~crdiff_cli.pipelines.conditioning.ImageInputs`) picks diffusers' ControlNet / img2img / inpainting pipeline.
    FID's real images are ``reference_files`` when given (the ``paper`` COCO prompt set's own images), else the
    whole ``reference_images`` folder; ``fid_resize`` is FID's preprocessing (256: 256x256 bicubic; None: as is).
    """
    from crdiff_cli.evaluation.metrics import load_metrics
    from crdiff_cli.pipelines.prepare import load_prepared
    from crdiff_cli.pruning.profile_table import choose_ratios
    from crdiff_cli.runtime.distributed import SINGLE
    from crdiff_cli.storage.journal import open_journal

    ranks = ranks or SINGLE
    loaded = load_prepared(model, dtype=dtype, device=ranks.device(device), loras=loras, inputs=inputs)
    choices = {}
    for res in settings:
        choice = choose_ratios(loaded.family, ratios=ratios, profile=profile, resolution=res)
        if choice.warning and (not choices or ratios is None and profile is None):
            warn(choice.warning)
        choices[res] = choice
    image_metrics, fid = load_metrics(specs if ranks.is_main else [s for s in specs if s.per_image],
                                      device=ranks.device(device), reference_images=reference_images,
                                      reference_files=reference_files, fid_resize=fid_resize)
    info = {"model": model, "family": loaded.family, "dtype": dtype, "device": device,  # as generate records it
            **({"loras": [x.label for x in loras]} if loras else {}), **(inputs.info() if inputs is not None else {})}
    evaluation = Evaluation(loaded, model_info=info, ratio_choices=choices, settings=settings, prompts=prompts, k=k,
                            metrics=image_metrics, out_dir=out_dir)
    session = Session(evaluation, None, [], specs, fid, identity, out_dir, ranks)

    def open_scores() -> None:  # on rank 0; an error there stops every rank
        session.journal, session.records = open_journal(out_dir / SCORES, identity, resume=resume,
                                                        overwrite=overwrite, kind=JOURNAL_KIND)

    ranks.on_main(open_scores)
    return session


def finish(session: Session, items: list[WorkItem], variants: list[str], resolutions: list[Resolution]):
    """FID, summaries, paired comparisons; writes results.csv/json, paired.csv, timings.csv and report.html."""
    from crdiff_cli.evaluation import report as eval_report, results as eval_results

    ev = session.evaluation
    fid = None
    if session.fid is not None:
        fid = {}
        for res in resolutions:
            for variant in variants:
                paths = [session.out_dir / i.image for i in items if i.resolution == res and i.variant == variant]
                fid[(str(res), variant)] = (len(paths), session.fid.distance(paths))
    info = {(str(res), v): (ev.variant_k(v), "" if v == "dense" else str(ev.choices[res].ratios))
            for res in resolutions for v in variants}
    names = [str(r) for r in resolutions]
    results = eval_results.compute(session.records, specs=session.specs, resolutions=names, variants=variants,
                                   variant_info=info, fid=fid,
                                   steps={str(r): ev.settings[r].steps for r in resolutions})
    run_info = {**session.identity, "ratios_used": {str(r): str(c.ratios) for r, c in ev.choices.items()},
                "scorers": {m.spec.name: m.scorer.name for m in ev.metrics}}  # e.g. which aesthetic predictor
    eval_results.write(session.out_dir, results, run_info)
    eval_results.write_text(session.out_dir / eval_results.TIMINGS_CSV, eval_results.timings_csv(ev.seconds))
    page = eval_report.render(title=f"crdiff evaluate: {session.identity['model']}", run=run_info,
                              results=results, records=session.records, specs=session.specs, variants=variants,
                              resolutions=names, prompts=ev.prompts)
    eval_results.write_text(session.out_dir / REPORT, page)
    return results
