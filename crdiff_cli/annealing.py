"""Simulated annealing over pruning ratios (CR-Diff, Algorithm 1).

The annealer is a pure, resumable state machine: `step` performs exactly one
energy evaluation and returns a record holding the complete state *after* it.
A caller that journals each record can crash at any point and resume from the
last journaled state without losing or repeating an evaluation, because every
source of randomness (the RNG state) lives in that state.

Two stagnation rules are supported:
  * "patience" (default; the reference code behind the paper's Table 6): after
    `patience` iterations without a new best, reheat (only once the best score
    -E_best exceeds `reheat_min_score`) or else restart from a large mutation of
    the best; stop when neither is allowed any more.
  * "t-floor" (Algorithm 1 as printed): when T cools below `t_floor`, reset T to
    `t_init`; stop after more than `max_restarts` such resets.

Restart accounting: a restart only *schedules* a mutated candidate
(`AnnealState.pending`); the next iteration evaluates it instead of a neighbour
and accepts it unconditionally. So every iteration costs exactly one
evaluation, and a journaled state never hides an un-journaled evaluation.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

Vector = tuple[float, ...]
Energy = Callable[[Vector], float]
RULES = ("patience", "t-floor")
DECIMALS = 4  # candidates are rounded so identical ones hit the caller's cache


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
    restart_mult: float = 3.0
    t_floor: float = 1e-3
    seed: int = 0

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
    reheats: int = 0
    restarts: int = 0
    pending: Optional[Vector] = None  # restart candidate the next iteration evaluates
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
    iteration: int  # 1-based iteration, or the seed index for kind "seed"
    candidate: Vector
    energy: float
    accepted: bool  # became current (for seeds: best seed so far)
    t: float  # temperature used for this evaluation's acceptance test
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


def _clip_round(x: Vector, config: AnnealConfig) -> Vector:
    return tuple(min(max(round(v, DECIMALS), lo), hi) for v, (lo, hi) in zip(x, config.bounds))


def _step_size(config: AnnealConfig, t: float) -> float:
    """Step shrinks with T so the search moves from exploring to refining."""
    return max(config.min_step, config.step_frac * t / config.t_init)


def _neighbour(rng: random.Random, config: AnnealConfig, x: Vector, s: float) -> Vector:
    i = rng.randrange(len(x))
    moved = list(x)
    moved[i] += rng.uniform(-s, s) * config.step_scale[i]
    return _clip_round(tuple(moved), config)


def _mutate(rng: random.Random, config: AnnealConfig, x: Vector, s: float) -> Vector:
    return _clip_round(tuple(v + rng.uniform(-s, s) * k for v, k in zip(x, config.step_scale)), config)


def step(energy: Energy, config: AnnealConfig, state: AnnealState) -> EvalRecord:
    """Perform exactly one energy evaluation and return its record."""
    if state.phase == "done":
        raise ValueError("annealing already finished: nothing to step")
    rng = random.Random()
    rng.setstate(state.rng)
    if state.phase == "seeding":
        cand = _clip_round(config.seeds[state.seed_index], config)
        e = float(energy(cand))
        accepted = state.e_best is None or e < state.e_best
        cur, e_cur = (cand, e) if accepted else (state.current, state.e_current)
        nxt = state.seed_index + 1
        new = replace(state, phase="seeding" if nxt < len(config.seeds) else "iterating",
                      seed_index=nxt, evaluations=state.evaluations + 1,
                      current=cur, e_current=e_cur, best=cur, e_best=e_cur)
        return EvalRecord("seed", state.seed_index, cand, e, accepted, state.t, new)

    it, t = state.iteration + 1, state.t
    if state.pending is not None:
        kind, cand = "restart", state.pending
    else:
        kind, cand = "neighbour", _neighbour(rng, config, state.current, _step_size(config, t))
    e = float(energy(cand))
    # Metropolis; a restart candidate replaces current unconditionally.
    accepted = kind == "restart" or e < state.e_current or rng.random() < math.exp(-(e - state.e_current) / t)
    cur, e_cur = (cand, e) if accepted else (state.current, state.e_current)
    improved = e_cur < state.e_best
    best, e_best = (cur, e_cur) if improved else (state.best, state.e_best)
    no_improve = 0 if improved else state.no_improve + 1
    t_next, reheats, restarts, pending, stop = t * config.alpha, state.reheats, state.restarts, None, None

    if it >= config.iters:
        stop = "max_iters"
    elif config.rule == "t-floor":
        if t_next < config.t_floor:
            t_next, restarts = config.t_init, restarts + 1
            if restarts > config.max_restarts:
                stop = "t_floor"
    elif no_improve >= config.patience_iters:
        no_improve = 0
        if -e_best > config.reheat_min_score and reheats < config.max_reheats:
            t_next, reheats = t_next * config.reheat_factor, reheats + 1
        elif restarts < config.max_restarts:
            restarts += 1
            pending = _mutate(rng, config, best, config.restart_mult * _step_size(config, t_next))
        else:
            stop = "stagnation"

    new = replace(state, phase="done" if stop else "iterating", rng=rng.getstate(), t=t_next,
                  iteration=it, evaluations=state.evaluations + 1, current=cur, e_current=e_cur,
                  best=best, e_best=e_best, no_improve=no_improve, reheats=reheats,
                  restarts=restarts, pending=pending, stop_reason=stop)
    return EvalRecord(kind, it, cand, e, accepted, t, new)


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
