"""Unit tests for crdiff_cli.search.annealing (simulated annealing, CR-Diff Algorithm 1)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reference_loop import reference_search

from crdiff_cli.search.annealing import AnnealConfig, AnnealState, anneal, initial_state, step
from crdiff_cli.search.runner import cache_key

NEAR = (0.38, 0.25, 0.42)  # within the default schedule's reach of the (0.3, 0.3, 0.3) seed
FAR = (0.45, 0.22, 0.61)


def bowl(centre, scale=1000.0):
    return lambda x: scale * sum((a - b) ** 2 for a, b in zip(x, centre))


def rugged(x):
    """Deterministic multi-modal energy below -0.8, so both reheats and restarts occur."""
    return -1.0 + sum((a - c) ** 2 for a, c in zip(x, NEAR)) + 0.01 * math.sin(40 * sum(x))


def run_recorded(energy, config, state=None):
    records = []
    result = anneal(energy, config, state=state, on_eval=records.append)
    return result, records


def json_roundtrip(state):
    return AnnealState.from_dict(json.loads(json.dumps(state.to_dict())))


# --- the reference code's loop, move for move ------------------------------------

def rough_score(d, m, u):
    """A rough landscape that crosses 0.8: a broad hill plus ripples finer than a late step."""
    return (0.82 - 3 * ((d - 0.42) ** 2 + (m - 0.27) ** 2 + (u - 0.36) ** 2)
            + 0.05 * math.sin(300 * d + 3) * math.cos(211 * m) + 0.04 * math.sin(257 * u + 3))


SCORES = {  # objectives as the reference sees them: a score, higher is better
    "flat below 0.8": lambda d, m, u: 0.5,
    "flat above 0.8": lambda d, m, u: 0.9,  # the seed scores > 0.8, which must NOT unlock reheating
    "bowl": lambda d, m, u: 1.0 - 20 * ((d - 0.45) ** 2 + (m - 0.25) ** 2 + (u - 0.5) ** 2),
    "rough": rough_score,
}


def crdiff_run(score_of, config):
    """crdiff's annealer on ``score_of`` behind the search's score cache (keyed to 4 decimals)."""
    cache = {}

    def energy(x):
        key = cache_key(x)
        if key not in cache:
            cache[key] = score_of(*x)
        return -cache[key]

    return run_recorded(energy, config)


@pytest.mark.parametrize("iters", [120, 30, 10])
@pytest.mark.parametrize("seed", [42, 1, 7])
@pytest.mark.parametrize("objective", SCORES)
def test_loop_equals_the_reference_candidate_for_candidate(objective, seed, iters):
    evaluations, best, best_score, stop = reference_search(SCORES[objective], iterations=iters, rng_seed=seed)
    result, records = crdiff_run(SCORES[objective], AnnealConfig(iters=iters, seed=seed))
    assert [(r.kind, r.candidate) for r in records] == evaluations
    assert (result.best, -result.energy, result.stop_reason, result.evaluations) == (
        best, best_score, stop, len(evaluations))


def test_defaults_are_the_reference_defaults():
    # Seed 42, 120 iterations, one seed 0.3/0.3/0.3, T_init 0.1, alpha 0.95, bounds [0.1, 0.8].
    for objective in ("bowl", "rough"):
        evaluations, best, _, _ = reference_search(SCORES[objective])
        result, records = crdiff_run(SCORES[objective], AnnealConfig())
        assert [(r.kind, r.candidate) for r in records] == evaluations and result.best == best


def test_several_seeds_equal_the_reference():
    seeds = ((0.3, 0.3, 0.3), (0.45, 0.2, 0.4), (0.123456, 0.7, 0.7))
    evaluations, best, _, _ = reference_search(rough_score, iterations=40, seeds=seeds)
    result, records = crdiff_run(rough_score, AnnealConfig(iters=40, seeds=seeds))
    assert [(r.kind, r.candidate) for r in records] == evaluations and result.best == best


def test_the_comparisons_cover_every_rule():
    """Makes the comparison above meaningful: each rule of the loop happens in some compared run."""
    seen = set()
    for objective in SCORES:
        for seed in (42, 1, 7):
            for iters in (120, 30, 10):
                _, records = crdiff_run(SCORES[objective], AnnealConfig(iters=iters, seed=seed))
                final = records[-1].state
                seen.add(f"stop {final.stop_reason}")
                seen |= {"reheat"} if final.reheats else set()
                seen |= {"reheat and restart"} if final.reheats and final.restarts else set()
                seen |= {"restart on the last iteration"} if records[-1].kind == "restart" else set()
                candidates = [r.candidate for r in records]
                seen |= {"repeat within 4 decimals"} if any(
                    cache_key(a) == cache_key(b) and a != b for i, a in enumerate(candidates)
                    for b in candidates[:i]) else set()
                seen |= {"clipped at a bound"} if any(x in (0.1, 0.8) for c in candidates for x in c) else set()
                seen |= {"rejected"} if not all(r.accepted for r in records) else set()
    assert seen == {"stop stagnation", "stop max_iters", "reheat", "reheat and restart",
                    "restart on the last iteration", "repeat within 4 decimals", "clipped at a bound", "rejected"}


# --- optimisation quality ---------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_finds_bowl_minimum_with_defaults(seed):
    result = anneal(bowl(NEAR), AnnealConfig(seed=seed))
    assert all(abs(a - b) <= 0.02 for a, b in zip(result.best, NEAR)), result.best


def test_t_floor_reheating_reaches_far_minimum():
    # Resetting T restores large steps, extending the reach beyond one cooling schedule. The search is
    # stochastic: nearly every seed gets there (9 of these 10 do).
    reached = [all(abs(a - b) <= 0.02 for a, b in zip(anneal(bowl(FAR, 100.0), AnnealConfig(
        seed=seed, rule="t-floor", iters=400)).best, FAR)) for seed in range(10)]
    assert sum(reached) >= 8, reached


# --- determinism and resume -------------------------------------------------

def candidates(seed):
    _, records = run_recorded(bowl(NEAR), AnnealConfig(seed=seed))
    return [r.candidate for r in records]


def test_same_seed_same_sequence_different_seed_differs():
    assert candidates(1) == candidates(1)
    assert candidates(1) != candidates(2)


def test_state_json_roundtrip_is_lossless():
    _, records = run_recorded(rugged, AnnealConfig(patience=8))
    for r in records:
        assert json_roundtrip(r.state) == r.state
    assert any(r.state.pending is not None for r in records)  # a pending restart is covered


@pytest.mark.parametrize("case", ["reheats and restarts", "restart on the last iteration"])
def test_resume_from_every_record_reproduces_run(case):
    if case == "reheats and restarts":
        energy, config = rugged, AnnealConfig(seeds=((0.3, 0.3, 0.3), (0.6, 0.6, 0.6)), patience=8, seed=3)
    else:
        energy, config = (lambda x: -0.5), AnnealConfig(iters=10)
    full, records = run_recorded(energy, config)
    kinds = {r.kind for r in records}
    assert kinds == {"seed", "neighbour", "restart"}
    assert records[-1].state.reheats > 0 if case == "reheats and restarts" else records[-1].kind == "restart"
    for n, record in enumerate(records):
        resumed, tail = run_recorded(energy, config, state=json_roundtrip(record.state))
        assert [r.to_dict() for r in records[: n + 1] + tail] == [r.to_dict() for r in records]
        assert (resumed.best, resumed.energy, resumed.evaluations, resumed.stop_reason) == (
            full.best, full.energy, full.evaluations, full.stop_reason)
        assert full.history == [r.light() for r in records[: n + 1]] + resumed.history


def test_resume_in_fresh_process(tmp_path):
    config = AnnealConfig(patience=8, seed=5)
    full, records = run_recorded(rugged, config)
    cut = records[len(records) // 2]
    (tmp_path / "state.json").write_text(json.dumps(cut.state.to_dict()))
    script = (
        "import json, sys, test_annealing as t\n"
        "from crdiff_cli.search.annealing import AnnealConfig, AnnealState\n"
        "state = AnnealState.from_dict(json.load(open(sys.argv[1])))\n"
        "res, recs = t.run_recorded(t.rugged, AnnealConfig(patience=8, seed=5), state)\n"
        "print(json.dumps([[list(r.candidate) for r in recs], list(res.best), res.evaluations]))\n"
    )
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "state.json")],
                         capture_output=True, text=True, env=env, check=True).stdout
    tail, best, evaluations = json.loads(out)
    assert tail == [list(r.candidate) for r in records[cut.state.evaluations:]]
    assert (tuple(best), evaluations) == (full.best, full.evaluations)


def test_resume_from_done_state_evaluates_nothing():
    _, records = run_recorded(bowl(NEAR), AnnealConfig(iters=3))
    calls = []
    result = anneal(lambda x: calls.append(x) or 0.0, AnnealConfig(iters=3), state=records[-1].state)
    assert calls == [] and result.evaluations == 4 and result.history == []
    with pytest.raises(ValueError):
        step(bowl(NEAR), AnnealConfig(iters=3), records[-1].state)


# --- moves ------------------------------------------------------------------

def test_neighbour_changes_one_coordinate_within_bounds_at_full_precision():
    config = AnnealConfig(bounds=((0.1, 0.8), (0.1, 0.8), (0.1, 0.2)), seeds=((0.3, 0.3, 0.15),))
    _, records = run_recorded(bowl(FAR), config)
    changed = set()
    previous = records[0].state
    for r in records[1:]:
        if r.kind == "neighbour":
            diff = [i for i, (a, b) in enumerate(zip(r.candidate, previous.current)) if a != b]
            assert len(diff) <= 1
            changed.update(diff)
            s = max(config.min_step, config.step_frac * previous.t / config.t_init)
            assert all(abs(a - b) <= s + 1e-4 for a, b in zip(r.candidate, previous.current))
        assert all(lo <= x <= hi for x, (lo, hi) in zip(r.candidate, config.bounds))
        previous = r.state
    assert changed == {0, 1, 2}
    assert all(any(round(x, 4) != x for x in r.candidate) for r in records[1:5])  # not rounded to 4 decimals
    assert any(r.candidate[2] == 0.2 for r in records)  # pushed against the bound and clipped


def test_best_of_seeds_becomes_start():
    seeds = ((0.3, 0.3, 0.3), (0.37, 0.26, 0.43), (0.123456, 0.7, 0.7))
    _, records = run_recorded(bowl(NEAR), AnnealConfig(seeds=seeds, iters=1))
    assert [r.kind for r in records] == ["seed", "seed", "seed", "neighbour"]
    assert [r.accepted for r in records[:3]] == [True, True, False]
    assert records[2].candidate == seeds[2]  # full precision
    assert records[2].state.current == records[2].state.best == seeds[1]
    assert records[3].iteration == 1 and records[3].t == 0.1


# --- stagnation rules -------------------------------------------------------

def test_patience_low_score_restarts_twice_then_stops():
    # Only the seed scores 0 (score <= 0.8, so no reheat); every other candidate is far worse.
    start = (0.3, 0.3, 0.3)
    _, records = run_recorded(lambda x: 0.0 if x == start else 5.0, AnnealConfig())  # patience = 24
    final = records[-1].state
    assert (final.reheats, final.restarts, final.stop_reason) == (0, 2, "stagnation")
    # A restart is evaluated within the iteration that triggered it: 72 iterations, 1 + 72 + 2 evaluations.
    assert final.iteration == 72 and final.evaluations == 75
    assert [r.iteration for r in records if r.kind == "restart"] == [24, 48]
    restart = records[25]  # seed record + 24 iterations precede it
    assert restart.kind == "restart" and restart.candidate == records[24].state.pending
    # The worse restart candidate replaces current unconditionally; the best is kept; T goes back to T_init.
    assert restart.accepted and restart.state.current == restart.candidate != start
    assert restart.t == records[24].state.t < 0.1 and restart.state.t == 0.1 and records[26].t == 0.1
    # ONE coordinate of the best moves, by at most s = 0.30 (the step of temperature 3 x T_init).
    moved = [abs(a - b) for a, b in zip(restart.candidate, start) if a != b]
    assert len(moved) == 1 and moved[0] <= 0.30
    assert final.best == start


def test_patience_score_at_threshold_does_not_reheat():
    _, records = run_recorded(lambda x: -0.8, AnnealConfig(patience=10))
    assert (records[-1].state.reheats, records[-1].state.restarts) == (0, 2)


def test_seed_or_restart_score_above_threshold_does_not_unlock_reheating():
    # Everything scores 0.9 (> 0.8), but no neighbour ever finds a NEW best: restarts only.
    _, records = run_recorded(lambda x: -0.9, AnnealConfig(patience=10))
    final = records[-1].state
    assert (final.reheats, final.restarts, final.stop_reason, final.reheat_unlocked) == (0, 2, "stagnation", False)
    # A restart that finds a new best above 0.8 does not unlock it either.
    calls = []  # the seed scores 0.9, the first restart (12th evaluation) 0.95, every other candidate 0.5

    def energy(x):
        calls.append(x)
        return {1: -0.9, 12: -0.95}.get(len(calls), -0.5)

    _, records = run_recorded(energy, AnnealConfig(patience=10))
    assert records[11].kind == "restart" and records[11].state.best == records[11].candidate
    assert records[-1].state.reheats == 0 and not records[-1].state.reheat_unlocked


def test_patience_reheats_three_times_once_a_neighbour_best_beats_threshold():
    # The seed scores 0.85, every other candidate 0.9: the first neighbour is a new best > 0.8 and
    # unlocks reheating for good; nothing improves after it.
    config = AnnealConfig(patience=10)
    _, records = run_recorded(lambda x: -0.85 if x == (0.3, 0.3, 0.3) else -0.9, config)
    assert records[1].state.reheat_unlocked and records[1].state.no_improve == 0
    final = records[-1].state
    assert (final.reheats, final.restarts, final.stop_reason, final.iteration) == (3, 2, "stagnation", 61)
    assert [r.iteration for r in records if r.kind == "restart"] == [41, 51]
    assert records[11].state.t == pytest.approx(0.1 * 0.95 ** 11 * 1.5)
    assert records[12].t == records[11].state.t


def test_patience_is_checked_after_the_last_iteration():
    # patience 5 of 10 iterations: the 10th iteration triggers the second restart, evaluated before the end.
    _, records = run_recorded(lambda x: 0.0, AnnealConfig(iters=10))
    assert [(r.kind, r.iteration) for r in records[-2:]] == [("neighbour", 10), ("restart", 10)]
    assert records[-1].state.stop_reason == "max_iters" and records[-1].state.evaluations == 13


def test_t_floor_stops_after_max_restarts_plus_one_hits():
    config = AnnealConfig(rule="t-floor", iters=1000)
    result, records = run_recorded(lambda x: 0.0, config)
    hits = [r.iteration for r in records if r.kind == "neighbour" and r.state.t == config.t_init]
    assert hits == [90, 180, 270]  # 0.1 * 0.95**90 < 1e-3 <= 0.1 * 0.95**89
    assert result.stop_reason == "t_floor" and records[-1].state.restarts == 3
    assert result.evaluations == 271


# --- four coordinates (ratios + k) ------------------------------------------

def test_four_coordinate_run():
    centre = NEAR + (1.6,)
    improved = 0
    for seed in range(10):
        config = AnnealConfig(bounds=((0.1, 0.8),) * 3 + ((0.5, 3.0),), step_scale=(1.0, 1.0, 1.0, 5.0),
                              seeds=((0.3, 0.3, 0.3, 1.0),), seed=seed)
        result, records = run_recorded(bowl(centre), config)
        assert all(len(r.candidate) == 4 and 0.5 <= r.candidate[3] <= 3.0 for r in records)
        k_moves = [abs(b.candidate[3] - a.state.current[3]) for a, b in zip(records, records[1:]) if b.kind == "neighbour"]
        assert max(k_moves) > 0.1  # the 5x step scale is applied to k
        assert result.energy < records[0].energy
        improved += result.energy < 0.25 * records[0].energy and abs(result.best[3] - 1.6) < 0.3
    assert improved >= 8  # stochastic: 9 of these 10 seeds get there


# --- validation -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(iters=0), "iters"),
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=0.0), "alpha"),
    (dict(t_init=0.0), "t_init"),
    (dict(bounds=((0.8, 0.1),) * 3), "bounds"),
    (dict(seeds=((0.3, 0.3),)), "coordinates"),
    (dict(seeds=((0.05, 0.3, 0.3),)), "outside bounds"),
    (dict(seeds=()), "seeds"),
    (dict(step_scale=(1.0, 1.0)), "step_scale"),
    (dict(rule="linear"), "rule"),
    (dict(patience=0), "patience"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnnealConfig(**kwargs)


def test_config_normalises_lists_and_defaults():
    config = AnnealConfig(seeds=[[0.3, 0.3, 0.3]], bounds=[[0.1, 0.8]] * 3)
    assert config == AnnealConfig()
    assert config.step_scale == (1.0, 1.0, 1.0) and config.patience_iters == 24
    assert initial_state(config).phase == "seeding"
