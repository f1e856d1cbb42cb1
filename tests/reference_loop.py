"""The reference code's simulated-annealing loop, restated plainly (docs/search.md describes it step by step).

This is the oracle the tests compare crdiff's annealer against, candidate for candidate. It is
written independently of crdiff_cli.search.annealing, in the reference's own terms (scores, higher is
better; ratios as a dict; one module-level style loop), following the rule's description line by line.
``score_of(down, mid, up)`` is the objective; a candidate's score is cached under its ratios rounded
to 4 decimals, so a repeat within 4 decimals reuses the earlier score, as the reference's cache does.
"""

import math
import random

GROUPS = ("down", "mid", "up")


def reference_search(score_of, iterations=120, seeds=((0.3, 0.3, 0.3),), t_init=0.1, alpha=0.95, lo=0.1, hi=0.8,
                     rng_seed=42):
    """Returns (evaluations as [(kind, (down, mid, up))], best ratios, best score, stop reason)."""
    rng = random.Random(rng_seed)
    cache, evaluations = {}, []

    def score(r, kind):
        evaluations.append((kind, tuple(r[g] for g in GROUPS)))
        key = tuple(round(r[g], 4) for g in GROUPS)
        if key not in cache:
            cache[key] = score_of(*(r[g] for g in GROUPS))
        return cache[key]

    def neighbour(r, temperature):
        s = max(0.005, 0.10 * temperature / t_init)
        group = rng.choice(["down", "up", "mid"])
        new = dict(r)
        new[group] = min(max(new[group] + rng.uniform(-s, s), lo), hi)
        return new

    best, best_score = None, None
    for seed in seeds:
        r = dict(zip(GROUPS, seed))
        sc = score(r, "seed")
        if best_score is None or sc > best_score:
            best, best_score = r, sc
    current, current_score = best, best_score
    T = t_init
    patience = max(5, int(0.2 * iterations))
    stagnation, unlocked, reheats, restarts = 0, False, 0, 0
    for _ in range(iterations):
        cand = neighbour(current, T)
        sc = score(cand, "neighbour")
        if sc > current_score or rng.random() < math.exp((sc - current_score) / T):
            current, current_score = cand, sc
        if sc > best_score:
            best, best_score = cand, sc
            stagnation = 0
            if sc > 0.8:
                unlocked = True
        else:
            stagnation += 1
        T *= alpha
        if stagnation >= patience:
            if unlocked and reheats < 3:
                T *= 1.5
                reheats += 1
                stagnation = 0
            elif restarts < 2:
                restarts += 1
                stagnation = 0
                cand = neighbour(best, 3 * t_init)
                sc = score(cand, "restart")
                current, current_score = cand, sc
                T = t_init
                if sc > best_score:
                    best, best_score = cand, sc
            else:
                return evaluations, tuple(best[g] for g in GROUPS), best_score, "stagnation"
    return evaluations, tuple(best[g] for g in GROUPS), best_score, "max_iters"
