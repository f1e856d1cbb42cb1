"""Rich tables for the CLI's outputs (kept apart so the commands stay thin)."""

from __future__ import annotations

from rich.table import Table


def spec_table(spec, title: str) -> Table:
    """Per group: ratio, threshold, targets, pruned and actual sparsity of a PruneSpec."""
    table = Table(title=title)
    for col in ("group", "ratio", "threshold |w| <=", "layers", "targets", "pruned", "sparsity"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for group, g in spec.groups.items():
        table.add_row(group, f"{g.ratio:g}", "-" if g.threshold is None else f"{g.threshold:.6g}", str(g.layers),
                      f"{g.targets:,}", f"{g.pruned:,}", f"{g.sparsity:.2%}")
    return table


def profiles_table(profiles) -> Table:
    table = Table(title="Built-in profiles (CR-Diff Table 6; resolution = HEIGHTxWIDTH, * = native)")
    for col in ("name", "family", "resolution", "down", "mid", "up"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for p in profiles:
        r = p.ratios
        table.add_row(p.name, p.family, f"{p.resolution}{' *' if p.native_resolution else ''}",
                      f"{r.down:.3f}", f"{r.mid:.3f}", f"{r.up:.3f}")
    return table
