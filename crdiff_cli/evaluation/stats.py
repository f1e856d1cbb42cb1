"""Summary statistics of an evaluation: bootstrap confidence intervals and paired comparisons.

The paper reports means only. A mean over a few hundred prompts moves by more than the differences
Table 7 shows, so every mean here comes with a 95% percentile-bootstrap interval, and every
CR-Diff-vs-baseline comparison is *paired* (same prompt, same seed): the mean per-image difference
with its bootstrap interval, the win rate, and a Wilcoxon signed-rank p-value. The bootstrap RNG has a
fixed seed, so the same scores always give the same intervals (a resumed run reproduces them exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SEED = 0
BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95


def bootstrap_ci(values, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (resampling with a fixed seed)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Summary:
    """Mean of one metric over one variant's images, with spread and a 95% bootstrap interval."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(x)
    return Summary(len(x), float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan"), low, high)


@dataclass(frozen=True)
class Paired:
    """``a - b`` over images paired by (prompt, seed): is the difference real or noise?"""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    win_rate: float  # fraction of pairs where a beats b (ties count half), in the metric's better direction
    p_value: float  # two-sided Wilcoxon signed-rank test of the differences


def paired(a, b, *, higher_is_better: bool = True) -> Paired:
    """Compare paired scores ``a[i]`` vs ``b[i]``."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(diff) == 0:
        raise ValueError("paired() needs at least one pair")
    signed = diff if higher_is_better else -diff
    win_rate = float(((signed > 0).sum() + 0.5 * (signed == 0).sum()) / len(diff))
    low, high = bootstrap_ci(diff)
    if np.all(diff == 0):
        p = 1.0  # identical scores: no evidence of any difference (scipy returns nan here)
    else:
        p = float(wilcoxon(diff, zero_method="zsplit").pvalue)
    return Paired(len(diff), float(diff.mean()), low, high, win_rate, p)
