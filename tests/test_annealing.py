"""Unit tests for crdiff_cli.annealing (simulated annealing, CR-Diff Algorithm 1)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crdiff_cli.annealing import AnnealConfig, AnnealState, anneal, initial_state, step

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


# --- optimisation quality ---------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_finds_bowl_minimum_with_defaults(seed):
    result = anneal(bowl(NEAR), AnnealConfig(seed=seed))
    assert all(abs(a - b) <= 0.02 for a, b in zip(result.best, NEAR)), result.best
    assert result.evaluations == 121 and result.stop_reason == "max_iters"


@pytest.mark.parametrize("seed", range(3))
def test_t_floor_reheating_reaches_far_minimum(seed):
    # Resetting T restores large steps, extending the reach beyond one cooling schedule.
    result = anneal(bowl(FAR, 100.0), AnnealConfig(seed=seed, rule="t-floor", iters=400))
    assert all(abs(a - b) <= 0.02 for a, b in zip(result.best, FAR)), result.best


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


def test_resume_from_every_record_reproduces_run():
    config = AnnealConfig(seeds=((0.3, 0.3, 0.3), (0.6, 0.6, 0.6)), patience=8, seed=3)
    full, records = run_recorded(rugged, config)
    kinds = {r.kind for r in records}
    assert kinds == {"seed", "neighbour", "restart"} and records[-1].state.reheats > 0
    for n, record in enumerate(records):
        resumed, tail = run_recorded(rugged, config, state=json_roundtrip(record.state))
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
        "from crdiff_cli.annealing import AnnealConfig, AnnealState\n"
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

def test_neighbour_changes_one_coordinate_within_bounds_and_rounded():
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
        assert all(round(x, 4) == x for x in r.candidate)
        previous = r.state
    assert changed == {0, 1, 2}
    assert any(r.candidate[2] == 0.2 for r in records)  # pushed against the bound and clipped


def test_best_of_seeds_becomes_start():
    seeds = ((0.3, 0.3, 0.3), (0.37, 0.26, 0.43), (0.123456, 0.7, 0.7))
    _, records = run_recorded(bowl(NEAR), AnnealConfig(seeds=seeds, iters=1))
    assert [r.kind for r in records] == ["seed", "seed", "seed", "neighbour"]
    assert [r.accepted for r in records[:3]] == [True, True, False]
    assert records[2].candidate == (0.1235, 0.7, 0.7)
    assert records[2].state.current == records[2].state.best == seeds[1]
    assert records[3].iteration == 1 and records[3].t == 0.1


# --- stagnation rules -------------------------------------------------------

def test_patience_low_score_restarts_twice_then_stops():
    # Only the seed scores 0 (score <= 0.8, so no reheat); every other candidate is far worse.
    start = (0.3, 0.3, 0.3)
    _, records = run_recorded(lambda x: 0.0 if x == start else 5.0, AnnealConfig())  # patience = 24
    final = records[-1].state
    assert (final.reheats, final.restarts, final.stop_reason) == (0, 2, "stagnation")
    assert final.iteration == 72 and final.evaluations == 73
    assert [r.iteration for r in records if r.kind == "restart"] == [25, 49]
    restart = records[25]  # seed record + 24 iterations precede it
    assert restart.kind == "restart" and restart.candidate == records[24].state.pending
    # The worse restart candidate replaces current unconditionally; the best is kept.
    assert restart.accepted and restart.state.current == restart.candidate != start
    assert final.best == start


def test_patience_score_at_threshold_does_not_reheat():
    _, records = run_recorded(lambda x: -0.8, AnnealConfig(patience=10))
    assert (records[-1].state.reheats, records[-1].state.restarts) == (0, 2)


def test_patience_high_score_reheats_three_times_first():
    config = AnnealConfig(patience=10)
    _, records = run_recorded(lambda x: -0.9, config)
    final = records[-1].state
    assert (final.reheats, final.restarts, final.stop_reason, final.iteration) == (3, 2, "stagnation", 60)
    assert [r.iteration for r in records if r.kind == "restart"] == [41, 51]
    assert records[10].state.t == pytest.approx(0.1 * 0.95 ** 10 * 1.5)
    assert records[11].t == records[10].state.t


def test_t_floor_stops_after_max_restarts_plus_one_hits():
    config = AnnealConfig(rule="t-floor", iters=1000)
    result, records = run_recorded(lambda x: 0.0, config)
    hits = [r.iteration for r in records if r.kind == "neighbour" and r.state.t == config.t_init]
    assert hits == [90, 180, 270]  # 0.1 * 0.95**90 < 1e-3 <= 0.1 * 0.95**89
    assert result.stop_reason == "t_floor" and records[-1].state.restarts == 3
    assert result.evaluations == 271


# --- four coordinates (ratios + k) ------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_four_coordinate_run(seed):
    centre = NEAR + (1.6,)
    config = AnnealConfig(bounds=((0.1, 0.8),) * 3 + ((0.5, 3.0),), step_scale=(1.0, 1.0, 1.0, 5.0),
                          seeds=((0.3, 0.3, 0.3, 1.0),), seed=seed)
    result, records = run_recorded(bowl(centre), config)
    assert all(len(r.candidate) == 4 and 0.5 <= r.candidate[3] <= 3.0 for r in records)
    k_moves = [abs(b.candidate[3] - a.state.current[3]) for a, b in zip(records, records[1:])]
    assert max(k_moves) > 0.1  # the 5x step scale is applied to k
    assert result.energy < 0.15 * records[0].energy
    assert abs(result.best[3] - 1.6) < 0.3


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
