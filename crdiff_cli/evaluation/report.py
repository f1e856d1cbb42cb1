"""``report.html``: one page to judge an evaluation — the table, the paired differences as a forest plot next
to the direction the paper found, bar charts of the means, the images.

Self-contained: styles and charts (inline SVG) are in the page, nothing is fetched from the network;
images are the evaluation's own PNGs, referenced relative to the page (it lives in the output folder),
so the page stays small for thousands of images. Every text is HTML-escaped.
"""

from __future__ import annotations

from html import escape

from crdiff_cli.evaluation.metrics import LABELS

STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}.best{font-weight:bold}
.charts{display:flex;flex-wrap:wrap;gap:16px}.prompt{margin:14px 0;border-top:1px solid #ddd;padding-top:8px}
.row{display:flex;gap:10px;flex-wrap:wrap}figure{margin:0;text-align:center}figcaption{font-size:12px}
img{max-width:256px;min-width:96px;image-rendering:auto}small{color:#666}"""
COLORS = {"dense": "#8c8c8c", "pruned": "#4c78a8", "crdiff": "#e45756"}
POLICY_COLORS = ("#f58518", "#54a24b", "#b279a2", "#eeca3b", "#72b7b2", "#9d755d")  # POA policy variants, in order


def color_of(variant: str, variants: list[str]) -> str:
    """A variant's bar colour: fixed for dense / pruned / crdiff, one of POLICY_COLORS per policy variant."""
    if variant in COLORS:
        return COLORS[variant]
    policies = [v for v in variants if v not in COLORS]
    return POLICY_COLORS[policies.index(variant) % len(POLICY_COLORS)] if variant in policies else "#000"
# The paper's Table 7 (CR-Diff - pruned, 13 model x resolution rows): in how many rows CR-Diff did better
# (FID: lower), equal, and worse. Read off the table printed in docs/evaluate.md.
PAPER_TABLE7 = {"fid": (11, 0, 2), "clip": (11, 2, 0), "imagereward": (13, 0, 0), "pickscore": (11, 0, 2),
                "aesthetic": (4, 0, 9)}


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def best_variants(rows: list[dict], specs) -> set[tuple[str, str, str]]:
    """``(resolution, metric, variant)`` of the best mean per resolution and metric (FID: lowest)."""
    best = set()
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["resolution"], row["metric"]), []).append(row)
    direction = {s.name: (1 if s.higher_is_better else -1) for s in specs}
    for (res, metric), group in groups.items():
        if len(group) > 1:
            top = max(group, key=lambda r: direction[metric] * r["mean"])
            best.add((res, metric, top["variant"]))
    return best


def _table(rows, specs, variants, resolutions) -> str:
    by = {(r["resolution"], r["metric"], r["variant"]): r for r in rows}
    best = best_variants(rows, specs)
    head = "".join(f"<th colspan={len(variants)}>{escape(LABELS[s.name])} {'↑' if s.higher_is_better else '↓'}</th>"
                   for s in specs)
    sub = "".join(f"<th>{escape(v)}</th>" for _ in specs for v in variants)
    body = ""
    for res in resolutions:
        cells = ""
        for s in specs:
            for v in variants:
                r = by.get((res, s.name, v))
                title = f"95% CI {_fmt(r['ci_low'])}..{_fmt(r['ci_high'])}, n={r['n']}" if r else ""
                cls = " class=best" if (res, s.name, v) in best else ""
                cells += f"<td{cls} title='{escape(title)}'>{_fmt(r['mean']) if r else ''}</td>"
        body += f"<tr><th>{escape(res)}</th>{cells}</tr>"
    return f"<table><tr><th rowspan=2>resolution</th>{head}</tr><tr>{sub}</tr>{body}</table>"


def _chart(rows, spec, variants, resolutions) -> str:
    """Bars of the mean per resolution and variant, whiskers for the 95% interval (SVG)."""
    data = [(res, v, r) for res in resolutions for v in variants
            for r in rows if r["resolution"] == res and r["variant"] == v and r["metric"] == spec.name]
    if not data:
        return ""
    values = [x for _, _, r in data for x in (r["mean"], r["ci_low"], r["ci_high"]) if x is not None]
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    width, height, bar = 40 + 26 * len(data) + 12 * len(resolutions), 196, 22

    def y(value):
        return 20 + (high - value) / span * (height - 66)

    parts, x, group_start = [], 40, 40
    for i, (res, v, r) in enumerate(data):
        if i and data[i - 1][0] != res:
            parts.append(_group_label(data[i - 1][0], group_start, x, height))
            x += 12
            group_start = x
        top, zero = y(max(r["mean"], 0)), y(min(r["mean"], 0))
        parts.append(f"<rect x={x} y={top:.1f} width={bar} height={max(zero - top, 0.5):.1f} "
                     f"fill='{color_of(v, variants)}'>"
                     f"<title>{escape(res)} {escape(v)}: {_fmt(r['mean'])}</title></rect>")
        if r["ci_low"] is not None:
            cx = x + bar / 2
            parts.append(f"<path d='M{cx} {y(r['ci_low']):.1f}V{y(r['ci_high']):.1f}M{cx - 5} {y(r['ci_low']):.1f}"
                         f"h10M{cx - 5} {y(r['ci_high']):.1f}h10' stroke='#000'/>")
        x += 26
    parts.append(_group_label(data[-1][0], group_start, x, height))
    axis = f"<line x1=36 x2={width} y1={y(0):.1f} y2={y(0):.1f} stroke='#999'/>"
    ticks = "".join(f"<text x=2 y={y(t) + 4:.1f} font-size=10>{t:.3g}</text>" for t in (low, high))
    title = f"<text x=40 y=12 font-size=12>{escape(LABELS[spec.name])} (95% CI)</text>"
    return (f"<svg width={width} height={height} role=img>"
            f"{title}{ticks}{axis}{''.join(parts)}</svg>")


def _group_label(resolution: str, left: float, right: float, height: int) -> str:
    """A resolution's name under its group of bars."""
    return (f"<text x={(left + right - 4) / 2:.1f} y={height - 14} font-size=10 text-anchor=middle>"
            f"{escape(resolution)}</text>")


def _paper_direction(metric: str) -> str:
    if metric not in PAPER_TABLE7:
        return ""
    better, equal, worse = PAPER_TABLE7[metric]
    return (f"paper, Table 7 (CR-Diff − pruned): better in {better} of 13 rows"
            + (f", equal in {equal}" if equal else "") + (f", worse in {worse}" if worse else ""))


def _forest(pairs: list[dict], spec) -> str:
    """One metric's paired differences (a - b per image, mean and 95% interval) per resolution and comparison:
    a point and a line per row, the zero line, and which side is better."""
    rows = [p for p in pairs if p["metric"] == spec.name]
    if not rows:
        return ""
    ends = [x for p in rows for x in (p["ci_low"], p["ci_high"], p["mean_diff"]) if x is not None]
    reach = max(abs(x) for x in ends) or 1.0
    label_w, plot_w, text_w, row_h = 170, 260, 230, 22
    height = 46 + row_h * len(rows)

    def x(value):
        return label_w + plot_w / 2 + value / reach * (plot_w / 2 - 8)

    better = "higher" if spec.higher_is_better else "lower"
    parts = [f"<text x=0 y=13 font-size=12 font-weight=bold>{escape(LABELS[spec.name])}</text>",
             f"<text x={label_w} y=13 font-size=11>{escape(_paper_direction(spec.name))}</text>",
             f"<line x1={x(0):.1f} x2={x(0):.1f} y1=22 y2={height - 18} stroke='#999' stroke-dasharray='3 3'/>",
             f"<text x={label_w + plot_w} y={height - 4} font-size=10 text-anchor=end>"
             f"{'→' if spec.higher_is_better else '←'} CR-Diff better ({better} is better)</text>"]
    for i, p in enumerate(rows):
        cy = 34 + row_h * i
        name = f"{p['resolution']}  {p['a']} − {p['b']}"
        color = COLORS.get(p["b"], "#000")
        parts.append(f"<text x=0 y={cy + 4} font-size=11>{escape(name)}</text>")
        if p["ci_low"] is not None and p["ci_high"] is not None:
            parts.append(f"<line x1={x(p['ci_low']):.1f} x2={x(p['ci_high']):.1f} y1={cy} y2={cy} stroke='{color}' "
                         f"stroke-width='2'/>")
        parts.append(f"<circle cx={x(p['mean_diff']):.1f} cy={cy} r=4 fill='{color}'><title>{escape(name)}: "
                     f"{_fmt(p['mean_diff'])}</title></circle>")
        parts.append(f"<text x={label_w + plot_w + 8} y={cy + 4} font-size=11>{_fmt(p['mean_diff'])} "
                     f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]</text>")
    return (f"<svg width={label_w + plot_w + text_w} height={height} role=img class=forest>"
            f"{''.join(parts)}</svg>")


def _settings(run: dict) -> str:
    """The run's settings as a readable list (what was not set is left out)."""
    def shown(value) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value))
        return str(value)

    items = [(k.replace("_", " "), shown(v)) for k, v in run.items()
             if k not in ("prompts_sha256", "prompt_set", "scorers", "ratios_used") and v not in (None, "", [], {})]
    items += [(f"ratios at {res}", ratios) for res, ratios in (run.get("ratios_used") or {}).items()]
    items += [(f"scorer for {name}", scorer) for name, scorer in (run.get("scorers") or {}).items()]
    return "<table class=settings>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>"
                                                 for k, v in items) + "</table>"


def _paired_table(pairs) -> str:
    if not pairs:
        return ""
    rows = "".join(f"<tr><td>{escape(p['resolution'])}</td><td>{escape(LABELS[p['metric']])}</td>"
                   f"<td>{escape(p['a'])} − {escape(p['b'])}</td><td>{_fmt(p['mean_diff'])}</td>"
                   f"<td>{_fmt(p['ci_low'])} .. {_fmt(p['ci_high'])}</td><td>{p['win_rate']:.0%}</td>"
                   f"<td>{_fmt(p['p_value'])}</td></tr>" for p in pairs)
    return ("<h2>Paired differences</h2><table><tr><th>resolution</th><th>metric</th><th>pair</th>"
            "<th>mean diff</th><th>95% CI</th><th>win rate</th><th>p (Wilcoxon)</th></tr>" + rows + "</table>")


def _gallery(records, prompts, variants, resolutions) -> str:
    images: dict[tuple, str] = {}
    scores: dict[tuple, list[str]] = {}
    for r in records:
        key = (r["resolution"], r["prompt_index"], r["seed"], r["variant"])
        images[key] = r["image"]
        if r["metric"] is not None:
            scores.setdefault(key, []).append(f"{LABELS[r['metric']]} {r['score']:.3f}")
    out = []
    for res in resolutions:
        out.append(f"<h2>Images at {escape(res)}</h2>")
        cases = sorted({(i, s) for (rs, i, s, _) in images if rs == res})
        for index, seed in cases:
            figures = ""
            for v in variants:
                key = (res, index, seed, v)
                if key in images:
                    figures += (f"<figure><img src='{escape(images[key])}' alt='{escape(v)}'><figcaption><b>"
                                f"{escape(v)}</b><br>{escape(', '.join(scores.get(key, [])))}</figcaption></figure>")
            out.append(f"<div class=prompt><div>#{index} seed {seed}: {escape(prompts[index])}</div>"
                       f"<div class=row>{figures}</div></div>")
    return "".join(out)


def _protocol_lines(run: dict) -> str:
    """The choices the numbers depend on, in words: where the prompts came from, FID's preprocessing."""
    lines = []
    ps = run.get("prompt_set")
    if ps:
        if ps["sampler"] == "paper":
            skipped = f", {ps['missing']:,} missing from the reference folder and skipped" if ps.get("missing") else ""
            how = f"the paper's sampler (seed {ps['seed']}, {ps['size']:,} images drawn{skipped})"
        else:
            how = "the first images by id, one caption each"
        lines.append(f"prompts: MS-COCO captions {ps['source']} (sha256 {str(ps['source_sha256'])[:12]}), {how}")
    if run.get("fid_resize"):
        from crdiff_cli.evaluation.fid import FID_RESIZES, resize_description

        lines.append(f"FID preprocessing (--fid-resize {run['fid_resize']}): "
                     f"{resize_description(FID_RESIZES.get(run['fid_resize']))}")
    return "".join(f"<p>{escape(line)}</p>" for line in lines)


def render(*, title: str, run: dict, results, records: list[dict], specs, variants: list[str],
           resolutions: list[str], prompts: list[str]) -> str:
    """The whole page as a string."""
    charts = "".join(_chart(results.rows, s, variants, resolutions) for s in specs)
    forests = "".join(_forest(results.paired, s) for s in specs)
    costs = {r["variant"]: r.get("passes_per_step") for r in results.rows}
    legend = " ".join(f"<span style='color:{color_of(v, variants)}'>■</span> {escape(v)}"
                      + (f" ({costs[v]:.2f} passes/step)" if costs.get(v) is not None else "") for v in variants)
    paired = (f"<h2>Paired differences, 95% intervals</h2><p><small>CR-Diff minus the other variant, image by "
              f"image (same prompt and seed): an interval clear of the dashed zero line is a difference the run "
              f"measured; the paper's direction is shown per metric.</small></p><div>{forests}</div>"
              if forests else "")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{_protocol_lines(run)}"
            f"<details><summary>settings</summary>{_settings(run)}</details>"
            f"{_table(results.rows, specs, variants, resolutions)}<p><small>bold: best variant per resolution "
            f"and metric; hover a value for its 95% bootstrap interval</small></p>"
            f"{paired}<h2>Means with 95% intervals</h2><p>{legend}</p><div class=charts>{charts}</div>"
            f"{_paired_table(results.paired)}{_gallery(records, prompts, variants, resolutions)}</body></html>\n")
