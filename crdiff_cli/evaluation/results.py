"""The results of an evaluation, from its score records: results.csv/json and paired.csv.

One row per resolution x variant x metric (mean, std, 95% bootstrap interval; FID is one number per
image set, so it has no per-image spread), and one paired row per resolution x per-image metric x
comparison (CR-Diff vs pruned, CR-Diff vs dense) when both variants were run. Files are written
atomically; the same records always give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from crdiff_cli.evaluation.stats import paired, summarize

RESULTS_CSV, RESULTS_JSON, PAIRED_CSV = "results.csv", "results.json", "paired.csv"
COMPARISONS = (("crdiff", "pruned"), ("crdiff", "dense"))  # (a, b): a - b in paired.csv
RESULT_FIELDS = ("resolution", "variant", "k", "ratios", "metric", "n", "mean", "std", "ci_low", "ci_high",
                 "passes_per_step")
TIMINGS_CSV = "timings.csv"
TIMING_FIELDS = ("resolution", "variant", "images", "seconds_per_image", "vs_dense")
PAIRED_FIELDS = ("resolution", "metric", "a", "b", "n", "mean_diff", "ci_low", "ci_high", "win_rate", "p_value")


def comparisons(variants: list[str]) -> list[tuple[str, str]]:
    """The paired comparisons ``(a, b)``: CR-Diff against pruned and dense, and every POA policy variant
    against full CR-Diff and dense."""
    policies = [v for v in variants if v.startswith("crdiff") and v != "crdiff"]
    return list(COMPARISONS) + [(p, b) for p in policies for b in ("crdiff", "dense")]


@dataclass(frozen=True)
class Results:
    rows: list[dict]
    paired: list[dict]


def per_image_scores(records: list[dict]) -> dict[tuple[str, str, str], dict[tuple[int, int], float]]:
    """``{(resolution, variant, metric): {(prompt_index, seed): score}}``."""
    out: dict = {}
    for r in records:
        if r["metric"] is not None:
            out.setdefault((r["resolution"], r["variant"], r["metric"]), {})[(r["prompt_index"], r["seed"])] = r["score"]
    return out


def compute(records: list[dict], *, specs, resolutions: list[str], variants: list[str], variant_info: dict,
            fid: dict | None = None, steps: dict[str, int] | None = None) -> Results:
    """Summaries and paired comparisons. ``variant_info[(res, variant)] = (k, ratios)``;
    ``fid[(res, variant)] = (n, value)``. Each row carries the variant's cost, the UNet passes its images ran
    per denoising step (counted, ``unet_passes`` in the records; ``steps[res]`` steps per image)."""
    scores = per_image_scores(records)
    passes = _passes_per_step(records, steps or {})
    rows, pairs = [], []
    for res in resolutions:
        for spec in specs:
            for variant in variants:
                k, ratios = variant_info[(res, variant)]
                base = {"resolution": res, "variant": variant, "k": k, "ratios": ratios, "metric": spec.name}
                cost = {"passes_per_step": passes.get((res, variant))}
                if spec.per_image:
                    values = list(scores.get((res, variant, spec.name), {}).values())
                    if values:
                        rows.append({**base, **asdict(summarize(values)), **cost})
                elif fid and (res, variant) in fid:
                    n, value = fid[(res, variant)]
                    rows.append({**base, "n": n, "mean": value, "std": None, "ci_low": None, "ci_high": None, **cost})
            if not spec.per_image:
                continue
            for a, b in comparisons(variants):
                sa, sb = scores.get((res, a, spec.name)), scores.get((res, b, spec.name))
                if sa and sb:
                    keys = sorted(set(sa) & set(sb))
                    result = paired([sa[key] for key in keys], [sb[key] for key in keys],
                                    higher_is_better=spec.higher_is_better)
                    pairs.append({"resolution": res, "metric": spec.name, "a": a, "b": b, **asdict(result)})
    return Results(rows, pairs)


def _passes_per_step(records: list[dict], steps: dict[str, int]) -> dict[tuple[str, str], float]:
    """Mean counted UNet passes per step by ``(resolution, variant)``, each image counted once (records
    journaled before passes were counted have none)."""
    counts: dict[tuple[str, str], dict[tuple, int]] = {}
    for r in records:
        if r.get("unet_passes") is not None and r["resolution"] in steps:
            counts.setdefault((r["resolution"], r["variant"]), {})[(r["prompt_index"], r["seed"])] = r["unet_passes"]
    return {key: round(sum(c.values()) / len(c) / steps[key[0]], 6) for key, c in counts.items()}


def timings_csv(seconds: dict[tuple[str, str], list[float]]) -> str:
    """``timings.csv``: measured wall seconds per image by resolution and variant, and the ratio to dense at
    the same resolution. Kept out of the results files, which are the same bytes whatever the machine,
    batch size or number of ranks; under torchrun it holds the images rank 0 made."""
    dense = {res: sum(t) / len(t) for (res, variant), t in seconds.items() if variant == "dense" and t}
    rows = [{"resolution": res, "variant": variant, "images": len(t), "seconds_per_image": round(sum(t) / len(t), 4),
             "vs_dense": round(sum(t) / len(t) / dense[res], 3) if res in dense else None}
            for (res, variant), t in seconds.items() if t]
    return _csv(rows, TIMING_FIELDS)


def _clean(value):
    """NaN/inf -> None (JSON null, empty CSV cell)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _csv(rows: list[dict], fields: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _clean(row[k]) is None else row[k] for k in fields})
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(out_dir: Path, results: Results, run: dict) -> None:
    rows = [{k: _clean(v) for k, v in r.items()} for r in results.rows]
    pairs = [{k: _clean(v) for k, v in r.items()} for r in results.paired]
    write_text(out_dir / RESULTS_CSV, _csv(results.rows, RESULT_FIELDS))
    write_text(out_dir / PAIRED_CSV, _csv(results.paired, PAIRED_FIELDS))
    write_text(out_dir / RESULTS_JSON, json.dumps({"run": run, "results": rows, "paired": pairs}, indent=2) + "\n")
