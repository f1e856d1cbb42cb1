"""The CR-Diff ratio search (Algorithm 1) on resident models: candidates -> images -> scores -> energy.

:func:`search` drives the pure annealer (:mod:`crdiff_cli.search.annealing`) with an energy computed on the
loaded pipeline. The models are loaded once: the per-group magnitude statistics are built once
(:class:`~crdiff_cli.pruning.spec.PruneStats`, whose rank windows from :mod:`crdiff_cli.search.thresholds`
make nearby ratios a lookup), and each candidate only changes three thresholds that the
:class:`~crdiff_cli.dual.unet.DualUNet` re-applies to the groups that changed — no reload, no copy of
the UNet. The reference objective scores the pruned model alone (``k = 1``); ``k`` gives POA scoring
and ``search_k`` anneals k as a fourth coordinate; ``search_window`` anneals the end of the POA window
(POA on the first part of the steps only, dense after) as one more.

Every annealer step is journaled (:mod:`crdiff_cli.storage.journal`) with its full state, so a killed search
resumes exactly; candidates equal to 4 decimals (the reference's cache key) are scored once, and the
cache is rebuilt from the journal on resume. As in the reference, an image whose generation or scoring
raises scores ``fail_score`` (-2.0) while the others keep theirs, and a candidate with any failure is
not cached (it is scored again if it comes back); only KeyboardInterrupt stops a search.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from crdiff_cli import __version__, defaults
from crdiff_cli.dual.options import check_k
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.generation import GenerationSettings, generate_image
from crdiff_cli.pipelines.schedulers import set_scheduler
from crdiff_cli.pruning.profile_table import Profile
from crdiff_cli.pruning.ratios import Ratios
from crdiff_cli.runtime.distributed import SINGLE, Ranks
from crdiff_cli.search.annealing import AnnealConfig, AnnealState, EvalRecord, anneal
from crdiff_cli.storage.journal import open_journal

REFERENCE_IMAGE_SEED = 24432
REFERENCE_FAIL_SCORE = -2.0
REFERENCE_NEGATIVE_PROMPT = ""  # the reference's search passes "" (for SDXL, "" and None condition differently)
CACHE_DECIMALS = 4  # the reference's score cache is keyed by the ratios rounded to 4 decimals
DEFAULT_K_BOUNDS = (1.0, 2.0)  # --search-k: around the reference default 1.5 and the 1.2 of the paper's examples
DEFAULT_K_START = defaults.K
DEFAULT_WINDOW_BOUNDS = (0.1, 1.0)  # --search-window: STOP of a 0:STOP window; 1.0 is full POA
DEFAULT_WINDOW_START = 1.0


def prompts_sha256(prompts: list[str] | tuple[str, ...]) -> str:
    """Hash of the prompt set (one per line, in order): what a profile and a journal record about it."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def cache_key(candidate: tuple[float, ...]) -> tuple[float, ...]:
    """The score cache's key: a repeat within 4 decimals reuses the earlier score (the candidate stays exact)."""
    return tuple(round(x, CACHE_DECIMALS) for x in candidate)


def search_settings(resolution, steps: int = defaults.STEPS, guidance: float = defaults.GUIDANCE,
                    negative_prompt: str | None = REFERENCE_NEGATIVE_PROMPT, scheduler: str | None = None):
    """:class:`GenerationSettings` with a search's defaults: the reference's 30 steps, guidance 7.5 and
    negative prompt ``""`` (GenerationSettings' own default, ``None``, conditions SDXL differently)."""
    return GenerationSettings(resolution, steps, guidance, negative_prompt, scheduler)


def k_search_config(config: AnnealConfig, k_bounds: tuple[float, float] = DEFAULT_K_BOUNDS,
                    k_start: float = DEFAULT_K_START) -> AnnealConfig:
    """``config`` with k appended as a 4th coordinate to every seed, bound and step scale.

    k's step scale is its range over the ratios' range, so one temperature-scaled step moves k by the
    same fraction of its range as it moves a ratio (with [1, 2] vs [0.1, 0.8]: about 1.43x).
    """
    return with_coordinate(config, k_bounds, k_start)


def window_search_config(config: AnnealConfig, bounds: tuple[float, float] = DEFAULT_WINDOW_BOUNDS,
                         start: float = DEFAULT_WINDOW_START) -> AnnealConfig:
    """``config`` with the POA window's STOP (window ``0:STOP``) appended as the last coordinate."""
    return with_coordinate(config, bounds, start)


def with_coordinate(config: AnnealConfig, bounds: tuple[float, float], start: float) -> AnnealConfig:
    """``config`` with one more coordinate appended to every seed, bound and step scale; its step scale is its
    range over the ratios' range, so one temperature-scaled step moves it by the same fraction of its range."""
    lo, hi = config.bounds[0]
    scale = (bounds[1] - bounds[0]) / (hi - lo)
    return replace(config, seeds=tuple((*s, start) for s in config.seeds), bounds=(*config.bounds, tuple(bounds)),
                   step_scale=(*config.step_scale, scale))


@dataclass(frozen=True)
class SearchPlan:
    """Everything that defines a search's evaluations — and therefore its journal identity.

    ``k = None`` (reference) scores the pruned model alone; a number scores with POA at that k. With
    ``search_k``, k is the config's 4th coordinate instead (see :func:`k_search_config`). ``model``,
    ``dtype`` and ``scorer`` label the search; ``None`` takes them from the loaded model and scorer.
    """

    prompts: tuple[str, ...]
    settings: GenerationSettings
    config: AnnealConfig = AnnealConfig()
    image_seeds: tuple[int, ...] = (REFERENCE_IMAGE_SEED,)
    k: float | None = None
    search_k: bool = False
    fail_score: float = REFERENCE_FAIL_SCORE
    search_window: bool = False
    model: str | None = None
    dtype: str | None = None
    scorer: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "image_seeds", tuple(int(s) for s in self.image_seeds))
        if not self.prompts:
            raise CrdiffError("the search needs at least one prompt")
        if not self.image_seeds:
            raise CrdiffError("the search needs at least one image seed")
        if self.k is not None:
            if self.search_k:
                raise CrdiffError("k is annealed with search_k: set its start with k_search_config, not k")
            check_k(self.k)
        if self.search_window and self.k is None and not self.search_k:
            raise CrdiffError("a POA window needs POA: pass k (or search_k) with search_window")
        wanted = 3 + self.search_k + self.search_window
        if len(self.config.bounds) != wanted:
            extra = " and ".join(n for n, on in (("k", self.search_k), ("the POA window", self.search_window)) if on)
            raise CrdiffError(f"the anneal config has {len(self.config.bounds)} coordinates; a search over ratios"
                              f"{' and ' + extra if extra else ''} needs {wanted}")

    def bind(self, loaded, scorer) -> "SearchPlan":
        """Fill the labels left as None from the loaded model and scorer."""
        return replace(self, model=self.model or loaded.source,
                       dtype=self.dtype or str(loaded.unet.dtype).removeprefix("torch."),
                       scorer=self.scorer or scorer.name)

    def identity(self) -> dict:
        """What a journal must match to be resumed: any change here changes the evaluations."""
        s = self.settings
        return {"model": self.model, "dtype": self.dtype, "resolution": str(s.resolution), "steps": s.steps,
                "guidance": s.guidance, "negative_prompt": s.negative_prompt, "scheduler": s.scheduler,
                "prompts": len(self.prompts), "prompts_sha256": prompts_sha256(self.prompts),
                "image_seeds": list(self.image_seeds), "scorer": self.scorer, "k": self.k, "search_k": self.search_k,
                "fail_score": self.fail_score, **({"search_window": True} if self.search_window else {}),
                "anneal": json.loads(json.dumps(asdict(self.config)))}  # tuples as lists, as in the journal

    def decode(self, candidate: tuple[float, ...]) -> tuple[Ratios, float, PoaPolicy]:
        """A candidate vector -> (ratios, the POA k and the POA policy its images are generated with)."""
        k = candidate[3] if self.search_k else (1.0 if self.k is None else self.k)
        policy = PoaPolicy((0.0, candidate[-1])) if self.search_window else PoaPolicy()
        return Ratios(*candidate[:3]), float(k), policy


@dataclass(frozen=True)
class SearchStep:
    """One annealer step as journaled: the annealer's record plus how its energy was obtained."""

    number: int  # 1-based position in the journal (seeds included)
    record: EvalRecord
    score: float  # mean score over prompts x image seeds (a failed image counts fail_score)
    scores: tuple[float, ...] = ()  # per image, prompt-major
    error: str | None = None
    cached: bool = False  # an identical earlier candidate's result was reused
    seconds: dict = field(default_factory=dict, compare=False)  # prune, generate, score, total

    def to_dict(self) -> dict:
        return {"n": self.number, **self.record.to_dict(), "score": self.score, "scores": list(self.scores),
                "error": self.error, "cached": self.cached, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchStep":
        record = EvalRecord(d["kind"], d["iteration"], tuple(d["candidate"]), d["energy"], d["accepted"], d["t"],
                            AnnealState.from_dict(d["state"]))
        return cls(d["n"], record, d["score"], tuple(d["scores"]), d["error"], d["cached"], d.get("seconds", {}))


@dataclass(frozen=True)
class _Outcome:
    """What scoring one candidate produced (cached by candidate)."""

    score: float
    scores: tuple[float, ...]
    error: str | None


@dataclass(frozen=True)
class SearchResult:
    """The best candidate of a (possibly resumed) search and its whole history."""

    plan: SearchPlan
    family: str
    ratios: Ratios
    k: float  # the POA k the best score was measured with (1.0 = pruned model alone)
    poa: PoaPolicy  # the POA policy it was measured with (full POA unless the window was searched)
    score: float
    stop_reason: str
    history: tuple[SearchStep, ...]

    @property
    def computed(self) -> int:
        """Candidates actually generated and scored (cache hits excluded), over all resumes."""
        return sum(not e.cached for e in self.history)

    @property
    def failures(self) -> int:
        return sum(e.error is not None and not e.cached for e in self.history)

    def profile(self, name: str) -> Profile:
        """The result as a ``crdiff-profile/1`` profile that ``--profile PATH`` accepts."""
        plan, config = self.plan, self.plan.config
        identity = plan.identity()
        profile_k = self.k if plan.search_k else plan.k  # None: searched without POA, choose k when generating
        extra = {"score": self.score, "k": profile_k, "scored_k": self.k,
                 **({"poa": self.poa.to_dict()} if plan.search_window else {}), "scorer": plan.scorer,
                 "steps": plan.settings.steps, "prompts": len(plan.prompts), "prompts_sha256": identity["prompts_sha256"],
                 "model": plan.model, "search": {
                     "iterations": self.history[-1].record.state.iteration, "evaluations": len(self.history),
                     "computed": self.computed, "failures": self.failures, "stop_reason": self.stop_reason,
                     "seed": config.seed, "image_seeds": list(plan.image_seeds), "guidance": plan.settings.guidance,
                     "scheduler": plan.settings.scheduler, "negative_prompt": plan.settings.negative_prompt,
                     "dtype": plan.dtype, "search_k": plan.search_k, "search_window": plan.search_window,
                     "fail_score": plan.fail_score,
                     "anneal": identity["anneal"], "crdiff_version": __version__}}
        what = "one prompt (Specific CR-Diff)" if len(plan.prompts) == 1 else f"{len(plan.prompts)} prompts"
        return Profile(name=name, family=self.family, resolution=plan.settings.resolution, ratios=self.ratios,
                       source=f"crdiff search on {plan.model} ({plan.scorer}, {what})", extra=extra)


class _Evaluator:
    """The energy: re-threshold the resident dual UNet, generate every (prompt, seed), score, -mean.

    The annealer calls it exactly once per step; the details of that call are kept in ``last`` for
    the journal entry the step produces.
    """

    def __init__(self, loaded, dual, stats, scorer, plan: SearchPlan, cache: dict, ranks):
        self.loaded, self.dual, self.stats, self.scorer, self.plan = loaded, dual, stats, scorer, plan
        self.cache, self.ranks = cache, ranks
        self.last: tuple[_Outcome, bool, dict] | None = None

    def __call__(self, candidate) -> float:
        key = cache_key(candidate)
        started = time.perf_counter()
        cached = key in self.cache
        if cached:
            outcome, seconds = self.cache[key], {}
        else:
            outcome, seconds = self._evaluate(candidate)
            if outcome.error is None:  # as the reference: a candidate with a failure is scored again next time
                self.cache[key] = outcome
        seconds["total"] = time.perf_counter() - started
        self.last = (outcome, cached, seconds)
        return -outcome.score

    def _evaluate(self, candidate) -> tuple[_Outcome, dict]:
        """Score every (prompt, image seed); one that fails scores ``fail_score``, the others keep theirs."""
        plan, clock = self.plan, time.perf_counter
        seconds = {"prune": 0.0, "generate": 0.0, "score": 0.0}
        pairs = [(p, s) for p in plan.prompts for s in plan.image_seeds]
        t0 = clock()
        try:
            ratios, k, policy = plan.decode(candidate)
            self.dual.set_spec(self.stats.spec(ratios))
            self.dual.k = k
            self.dual.poa.policy = policy
            results = None
        except Exception as exc:  # noqa: BLE001 - one bad candidate must not end a long search
            results = [(plan.fail_score, _error_text(exc))] * len(pairs)
        seconds["prune"] = clock() - t0
        if results is None:
            # under torchrun each rank makes and scores its share of the images; every rank gets all results.
            # One image per scorer call (as the reference), so a score does not depend on where it was made.
            results = self.ranks.split(pairs, lambda share: [self._score_image(p, s, seconds) for p, s in share])
        scores = tuple(score for score, _ in results)
        errors = [error for _, error in results if error is not None]
        return _Outcome(sum(scores) / len(scores), scores, _failure_summary(errors, len(pairs))), seconds

    def _score_image(self, prompt: str, seed: int, seconds: dict) -> tuple[float, str | None]:
        """(score, None) for one image, or (``fail_score``, the error); adds its timings to ``seconds``."""
        clock = time.perf_counter
        try:
            t0 = clock()
            image = generate_image(self.loaded.pipe, prompt, seed, self.plan.settings)
            t1 = clock()
            seconds["generate"] += t1 - t0
            scores = [float(x) for x in self.scorer.score([image], [prompt])]
            seconds["score"] += clock() - t1
            if len(scores) != 1:
                raise ValueError(f"scorer returned {len(scores)} scores for 1 image")
            if not math.isfinite(scores[0]):
                raise ValueError(f"scorer returned a non-finite score: {scores[0]}")
            return scores[0], None
        except Exception as exc:  # noqa: BLE001 - one bad image must not end a long search
            return self.plan.fail_score, _error_text(exc)


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _failure_summary(errors: list[str], images: int) -> str | None:
    """The journal's ``error``: None, or the first failure (and how many of the images failed)."""
    if not errors:
        return None
    return errors[0] if len(errors) == 1 else f"{errors[0]} ({len(errors)} of {images} images failed)"


def search(loaded, scorer, plan: SearchPlan, *, journal: Path | None = None, resume: bool = False,
           overwrite: bool = False, masks: str = defaults.MASKS,
           on_eval: Callable[[SearchStep], None] | None = None, ranks: Ranks = SINGLE) -> SearchResult:
    """Run (or resume) the ratio search on ``loaded`` (a :class:`~crdiff_cli.pipelines.loading.LoadedModel`).

    ``scorer`` has ``.name`` and ``.score(images, prompts)`` (see :mod:`crdiff_cli.scorers`). With a
    ``journal`` path every step is appended durably; ``resume`` continues from it (the journal's
    identity must match ``plan``), ``overwrite`` replaces an existing one. ``on_eval`` sees every step
    this call runs (steps replayed from the journal are in the result's history). The pipeline's UNet
    is restored when the search ends.

    Under torchrun (``ranks``, see :mod:`crdiff_cli.runtime.distributed`) every rank calls this with the same
    arguments and runs the same annealer: each candidate's images are split across the ranks, each
    made and scored where it is made (one per scorer call), and every rank sees the energy one process
    computes. Rank 0 alone reads and
    writes the journal; on resume its entries reach every rank.
    """
    if journal is None and (resume or overwrite):
        raise CrdiffError("resume and overwrite need a journal path: pass journal=...")
    plan = plan.bind(loaded, scorer)
    writer, entries = None, []
    if journal is not None:
        def open_on_main():
            nonlocal writer
            writer, found = open_journal(journal, plan.identity(), resume=resume, overwrite=overwrite)
            return found

        entries = ranks.on_main(open_on_main)
    try:
        history = [SearchStep.from_dict(e) for e in entries]
        state = history[-1].record.state if history else None
        if state is None or state.phase != "done":
            state = _anneal_resident(loaded, scorer, plan, history, state, writer, masks, on_eval, ranks)
    finally:
        if writer is not None:
            writer.close()
    ratios, k, policy = plan.decode(state.best)
    return SearchResult(plan, loaded.family, ratios, k, policy, -state.e_best, state.stop_reason, tuple(history))


def _anneal_resident(loaded, scorer, plan: SearchPlan, history: list[SearchStep], state: AnnealState | None,
                     writer, masks: str, on_eval, ranks: Ranks) -> AnnealState:
    """Anneal to the end on the loaded models, appending each step to ``history`` (and the journal)."""
    from crdiff_cli.dual.apply import apply_crdiff  # imports torch and diffusers: only when a search runs
    from crdiff_cli.search.thresholds import search_stats

    cache = {cache_key(e.record.candidate): _Outcome(e.score, e.scores, e.error)
             for e in history if not e.cached and e.error is None}
    stats = search_stats(loaded.unet)
    set_scheduler(loaded.pipe, plan.settings.scheduler)
    dual = apply_crdiff(loaded.pipe, stats.spec(plan.decode(plan.config.seeds[0])[0]), k=1.0, masks=masks)
    evaluator = _Evaluator(loaded, dual, stats, scorer, plan, cache, ranks)

    def record(rec: EvalRecord) -> None:
        outcome, cached, seconds = evaluator.last
        step = SearchStep(len(history) + 1, rec, outcome.score, outcome.scores, outcome.error, cached, seconds)
        if writer is not None:
            writer.append(step.to_dict())
        history.append(step)
        if on_eval is not None:
            on_eval(step)

    try:
        anneal(evaluator, plan.config, state=state, on_eval=record)
    finally:
        loaded.pipe.unet = dual.release()
    return history[-1].record.state


def default_trace_path(profile: Path) -> Path:
    """``best.json`` -> ``best.trace.png`` in the same folder."""
    return Path(profile).with_name(f"{Path(profile).stem}.trace.png")


def save_result(result: SearchResult, profile_path: Path, trace_path: Path | None = None) -> Profile:
    """Write the result's profile (named after the file) and its trace PNG, each atomically, replacing old ones."""
    from crdiff_cli.pruning.profile_table import PROFILE
    from crdiff_cli.search.trace_plot import TRACE, save_trace
    from crdiff_cli.storage.atomic import atomic_path

    profile_path = Path(profile_path)
    profile = result.profile(profile_path.stem)
    with atomic_path(profile_path, overwrite=True, kind=PROFILE) as tmp:
        tmp.write_text(json.dumps(profile.to_dict(), indent=2) + "\n", encoding="utf-8")
    if trace_path is not None:
        plan = result.plan
        title = (f"crdiff search: model {plan.model} at {plan.settings.resolution} (HxW), scorer {plan.scorer}; "
                 f"best ratios {result.ratios}")
        with atomic_path(Path(trace_path), overwrite=True, kind=TRACE) as tmp:
            save_trace(result.history, title, tmp)
    return profile
