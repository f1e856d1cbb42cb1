"""Simulated annealing over pruning ratios (CR-Diff, Algorithm 1).

The annealer is a pure, resumable state machine: `step` performs exactly one
energy evaluation and returns a record holding the complete state *after* it.
A caller that journals each record can crash at any point and resume from the
last journaled state without losing or repeating an evaluation, because every
source of randomness (the RNG state) lives in that state.

The default reproduces the reference code's loop (the search behind the paper's
Table 6) move for move: with the same seed and the same scores it evaluates the
same candidates in the same order. One `random.Random(seed)` stream is drawn in
this order per iteration: the coordinate to move (from the reference's order
down, up, mid), its uniform step, then — only when the neighbour is not better
than current — the acceptance draw. Candidates keep full precision; a caller
that caches scores keys them to 4 decimals, as the reference's cache does.

Two stagnation rules are supported:
  * "patience" (default; the reference code): after `patience` iterations
    without a new global best found by a neighbour, reheat (only once such a
    best scored above `reheat_min_score`) or else restart from a one-coordinate
    move of the best, made with the step of temperature `restart_t_mult * t_init`;
    stop when neither is allowed any more.
  * "t-floor" (Algorithm 1 as printed): when T cools below `t_floor`, reset T to
    `t_init`; stop after more than `max_restarts` such resets.

Restart accounting: the reference evaluates a restart candidate at once, inside
the iteration that triggered it. Here that iteration's step draws the candidate
into `AnnealState.pending` and the next step evaluates it (kind "restart", same
iteration number, no iteration used up). The RNG draws and the scores are those
of the reference; splitting them over two steps keeps "one step = one
evaluation", so a journaled state never hides an un-journaled evaluation.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

Vector = tuple[float, ...]
Energy = Callable[[Vector], float]
RULES = ("patience", "t-floor")
REFERENCE_ORDER = (0, 2, 1)  # the reference draws the coordinate from (down, up, mid); vectors are D/M/U


@dataclass(frozen=True)
class AnnealConfig:
    """Hyperparameters; defaults are the paper's reference values."""

    t_init: float = 0.1
    alpha: float = 0.95
    iters: int = 120
    seeds: tuple[Vector, ...] = ((0.3, 0.3, 0.3),)
    bounds: tuple[tuple[float, float], ...] = ((0.1, 0.8),) * 3
    step_scale: Optional[Vector] = None  # None -> 1.0 per coordinate
    min_step: float = 0.005
    step_frac: float = 0.10
    rule: str = "patience"
    patience: Optional[int] = None  # None -> max(5, int(0.2 * iters))
    max_reheats: int = 3
    reheat_factor: float = 1.5
    reheat_min_score: float = 0.8
    max_restarts: int = 2
    restart_t_mult: float = 3.0  # a restart's step is the neighbour step at T = restart_t_mult * t_init
    t_floor: float = 1e-3
    seed: int = 42  # the reference seeds Python's random with 42

    def __post_init__(self) -> None:
        # Normalise list inputs (e.g. from JSON/CLI) to tuples so configs compare equal.
        bounds = tuple((float(lo), float(hi)) for lo, hi in self.bounds)
        seeds = tuple(tuple(float(x) for x in s) for s in self.seeds)
        scale = (1.0,) * len(bounds) if self.step_scale is None else tuple(map(float, self.step_scale))
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "step_scale", scale)
        if not bounds or any(not lo < hi for lo, hi in bounds):
            raise ValueError(f"bounds {bounds} invalid: give one (lo, hi) pair per coordinate with lo < hi")
        if len(scale) != len(bounds):
            raise ValueError(f"step_scale has {len(scale)} entries: give one per coordinate ({len(bounds)})")
        if not seeds:
            raise ValueError("seeds is empty: give at least one starting candidate")
        for s in seeds:
            if len(s) != len(bounds):
                raise ValueError(f"seed {s} has {len(s)} coordinates: give {len(bounds)} to match bounds")
            if any(not lo <= x <= hi for x, (lo, hi) in zip(s, bounds)):
                raise ValueError(f"seed {s} lies outside bounds {bounds}: move it inside or widen bounds")
        if self.iters < 1:
            raise ValueError(f"iters={self.iters}: must be >= 1")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha}: cooling factor must satisfy 0 < alpha < 1 (e.g. 0.95)")
        if not self.t_init > 0:
            raise ValueError(f"t_init={self.t_init}: initial temperature must be > 0 (e.g. 0.1)")
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r}: choose one of {RULES}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience={self.patience}: must be >= 1 or None for the default")

    @property
    def patience_iters(self) -> int:
        return self.patience if self.patience is not None else max(5, int(0.2 * self.iters))


@dataclass(frozen=True)
class AnnealState:
    """Everything needed to continue a run exactly; JSON-able via to_dict()."""

    phase: str  # "seeding" | "iterating" | "done"
    rng: tuple  # random.Random.getstate()
    t: float
    seed_index: int = 0  # next seed to evaluate
    iteration: int = 0  # iterations completed
    evaluations: int = 0  # energy calls so far (seeds included)
    current: Optional[Vector] = None
    e_current: Optional[float] = None
    best: Optional[Vector] = None
    e_best: Optional[float] = None
    no_improve: int = 0
    reheat_unlocked: bool = False  # a neighbour found a best scoring above reheat_min_score
    reheats: int = 0
    restarts: int = 0
    pending: Optional[Vector] = None  # restart candidate the next step evaluates (same iteration)
    stop_reason: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        version, internal, gauss = self.rng
        d["rng"] = [version, list(internal), gauss]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AnnealState":
        d = dict(d)
        version, internal, gauss = d["rng"]
        d["rng"] = (version, tuple(internal), gauss)
        for key in ("current", "best", "pending"):
            if d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class EvalRecord:
    """One energy evaluation; `state` is the state after processing it."""

    kind: str  # "seed" | "neighbour" | "restart"
    iteration: int  # 1-based iteration (a restart shares its iteration's), or the seed index for kind "seed"
    candidate: Vector
    energy: float
    accepted: bool  # became current (for seeds: best seed so far; a restart always)
    t: float  # temperature of the acceptance test (a restart: T before it resets T to t_init)
    state: AnnealState

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "iteration", "candidate", "energy", "accepted", "t")}
        return {**d, "candidate": list(self.candidate), "state": self.state.to_dict()}

    def light(self) -> dict:
        """The plotting subset kept in AnnealResult.history."""
        s = self.state
        return {"kind": self.kind, "iteration": self.iteration, "t": self.t,
                "e_current": s.e_current, "e_best": s.e_best}


@dataclass(frozen=True)
class AnnealResult:
    best: Vector
    energy: float
    evaluations: int  # total over the whole run, including before a resume
    stop_reason: str  # "max_iters" | "stagnation" | "t_floor"
    history: list = field(default_factory=list)  # light records of THIS call only


def initial_state(config: AnnealConfig) -> AnnealState:
    return AnnealState(phase="seeding", rng=random.Random(config.seed).getstate(), t=config.t_init)


def _clip(x: Vector, config: AnnealConfig) -> Vector:
    return tuple(min(max(v, lo), hi) for v, (lo, hi) in zip(x, config.bounds))


def _step_size(config: AnnealConfig, t: float) -> float:
    """Step shrinks with T so the search moves from exploring to refining."""
    return max(config.min_step, config.step_frac * t / config.t_init)


def _draw_order(n: int) -> tuple[int, ...]:
    """Coordinates in the order the reference draws from: down, up, mid, then any extra (k)."""
    return REFERENCE_ORDER + tuple(range(3, n)) if n >= 3 else tuple(range(n))


def _neighbour(rng: random.Random, config: AnnealConfig, x: Vector, s: float) -> Vector:
    """Move ONE coordinate by uniform(-s, s) (times its step scale), then clip; full precision."""
    i = rng.choice(_draw_order(len(x)))
    moved = list(x)
    moved[i] += rng.uniform(-s, s) * config.step_scale[i]
    return _clip(tuple(moved), config)


def step(energy: Energy, config: AnnealConfig, state: AnnealState) -> EvalRecord:
    """Perform exactly one energy evaluation and return its record."""
    if state.phase == "done":
        raise ValueError("annealing already finished: nothing to step")
    if state.phase == "seeding":
        return _seed_step(energy, config, state)
    if state.pending is not None:
        return _restart_step(energy, config, state)
    return _neighbour_step(energy, config, state)


def _seed_step(energy: Energy, config: AnnealConfig, state: AnnealState) -> EvalRecord:
    """Evaluate the next seed; the best seed so far is current and best."""
    cand = config.seeds[state.seed_index]
    e = float(energy(cand))
    accepted = state.e_best is None or e < state.e_best
    cur, e_cur = (cand, e) if accepted else (state.current, state.e_current)
    nxt = state.seed_index + 1
    new = replace(state, phase="seeding" if nxt < len(config.seeds) else "iterating",
                  seed_index=nxt, evaluations=state.evaluations + 1,
                  current=cur, e_current=e_cur, best=cur, e_best=e_cur)
    return EvalRecord("seed", state.seed_index, cand, e, accepted, state.t, new)


def _restart_step(energy: Energy, config: AnnealConfig, state: AnnealState) -> EvalRecord:
    """Evaluate the pending restart: it becomes current unconditionally, T goes back to t_init.

    It belongs to the iteration that triggered it (no iteration used up) and never unlocks reheating.
    """
    cand = state.pending
    e = float(energy(cand))
    best, e_best = (cand, e) if e < state.e_best else (state.best, state.e_best)
    stop = "max_iters" if state.iteration >= config.iters else None
    new = replace(state, phase="done" if stop else "iterating", t=config.t_init,
                  evaluations=state.evaluations + 1, current=cand, e_current=e, best=best, e_best=e_best,
                  pending=None, stop_reason=stop)
    return EvalRecord("restart", state.iteration, cand, e, True, state.t, new)


def _neighbour_step(energy: Energy, config: AnnealConfig, state: AnnealState) -> EvalRecord:
    """One iteration: neighbour, Metropolis test, cooling, then the stagnation rule."""
    rng = random.Random()
    rng.setstate(state.rng)
    it, t = state.iteration + 1, state.t
    cand = _neighbour(rng, config, state.current, _step_size(config, t))
    e = float(energy(cand))
    # Metropolis: the acceptance draw is made only when the neighbour is not better (as the reference).
    accepted = e < state.e_current or rng.random() < math.exp(-(e - state.e_current) / t)
    cur, e_cur = (cand, e) if accepted else (state.current, state.e_current)
    new_best = e < state.e_best  # a new global best is always better than current, hence accepted
    best, e_best = (cand, e) if new_best else (state.best, state.e_best)
    no_improve = 0 if new_best else state.no_improve + 1
    unlocked = state.reheat_unlocked or (new_best and -e > config.reheat_min_score)
    t_next, reheats, restarts, pending, stop = t * config.alpha, state.reheats, state.restarts, None, None

    if config.rule == "t-floor":
        if it >= config.iters:
            stop = "max_iters"
        elif t_next < config.t_floor:
            t_next, restarts = config.t_init, restarts + 1
            if restarts > config.max_restarts:
                stop = "t_floor"
    else:
        if no_improve >= config.patience_iters:  # checked after every iteration, the last one included
            no_improve = 0
            if unlocked and reheats < config.max_reheats:
                t_next, reheats = t_next * config.reheat_factor, reheats + 1
            elif restarts < config.max_restarts:
                restarts += 1
                pending = _neighbour(rng, config, best, _step_size(config, config.restart_t_mult * config.t_init))
            else:
                stop = "stagnation"
        if stop is None and pending is None and it >= config.iters:
            stop = "max_iters"

    new = replace(state, phase="done" if stop else "iterating", rng=rng.getstate(), t=t_next,
                  iteration=it, evaluations=state.evaluations + 1, current=cur, e_current=e_cur,
                  best=best, e_best=e_best, no_improve=no_improve, reheat_unlocked=unlocked, reheats=reheats,
                  restarts=restarts, pending=pending, stop_reason=stop)
    return EvalRecord("neighbour", it, cand, e, accepted, t, new)


def anneal(energy: Energy, config: AnnealConfig, *, state: Optional[AnnealState] = None,
           on_eval: Optional[Callable[[EvalRecord], None]] = None) -> AnnealResult:
    """Run to completion, optionally resuming from a state taken from an EvalRecord.

    on_eval is called after every evaluation; journal `record.to_dict()` there
    and resume with `AnnealState.from_dict(journal[-1]["state"])`.
    """
    state = state if state is not None else initial_state(config)
    history = []
    while state.phase != "done":
        record = step(energy, config, state)
        state = record.state
        history.append(record.light())
        if on_eval is not None:
            on_eval(record)
    return AnnealResult(state.best, state.e_best, state.evaluations, state.stop_reason, history)
