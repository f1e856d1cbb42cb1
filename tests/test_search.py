"""The ratio search's library API (crdiff_cli.search.runner, journal, trace_plot, search_view) on the tiny model.

Every search here really generates images with the tiny SD1.5-shaped pipeline (64x64, 2 steps) and
scores them with the ``tiny`` scorer. Scorers defined in this file are ordinary user scorers (the
plugin API): they wrap the tiny scorer to count calls or to fail on purpose.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from reference_loop import reference_search

from crdiff_cli.dual.unet import attached_dual
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.generation import GenerationSettings
from crdiff_cli.pruning.profile_table import Profile
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.search.annealing import AnnealConfig
from crdiff_cli.search.runner import SearchPlan, cache_key, k_search_config, search, search_settings
from crdiff_cli.storage.journal import FORMAT, check_journal, read_journal

RES = Resolution(64, 64)
PROMPTS = ("a red cube on a table", "a lighthouse at night")


@pytest.fixture(scope="module")
def tiny_scorer():
    from crdiff_cli.scorers import load_scorer

    return load_scorer("tiny")


class Counting:
    """A user scorer around the tiny one: counts calls; ``fail(call)`` may return an exception to raise."""

    def __init__(self, inner, fail=None, name="tiny"):
        self.inner, self.fail, self.name, self.calls = inner, fail, name, 0

    def score(self, images, prompts):
        self.calls += 1
        problem = self.fail(self.calls) if self.fail else None
        if isinstance(problem, BaseException):
            raise problem
        scores = self.inner.score(images, prompts)
        return [problem] * len(scores) if problem is not None else scores


def plan(iters=4, bounds=(0.1, 0.8), **kwargs) -> SearchPlan:
    config = AnnealConfig(iters=iters, bounds=(bounds,) * 3, seed=kwargs.pop("seed", 0))
    return SearchPlan(kwargs.pop("prompts", PROMPTS), GenerationSettings(RES, steps=2), config, **kwargs)


def journal_lines(path):
    return path.read_text().splitlines()


def as_json(evaluation) -> dict:
    return json.loads(json.dumps(evaluation.to_dict()))


def comparable(entries):
    """Journal entries without wall-clock timings (the only field allowed to differ between runs)."""
    return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]


# --- end to end -------------------------------------------------------------------------------------

def test_search_journals_every_step_and_leaves_model_untouched(load_tiny, tiny_scorer, tmp_path):
    loaded = load_tiny("tiny")
    unet = loaded.pipe.unet
    dense = {n: p.detach().clone() for n, p in unet.named_parameters()}
    seen = []
    result = search(loaded, Counting(tiny_scorer), plan(), journal=tmp_path / "j.jsonl", on_eval=seen.append)

    lines = journal_lines(tmp_path / "j.jsonl")
    header, entries, _ = read_journal(tmp_path / "j.jsonl")
    assert header["format"] == FORMAT and header["identity"]["prompts"] == 2
    assert header["identity"]["scorer"] == "tiny" and header["identity"]["resolution"] == "64x64"
    assert len(lines) == 1 + 5 and [e["n"] for e in entries] == [1, 2, 3, 4, 5]
    assert [as_json(e) for e in seen] == entries == [as_json(e) for e in result.history]
    assert [e["kind"] for e in entries] == ["seed"] + ["neighbour"] * 4
    assert all(len(e["scores"]) == 2 and e["error"] is None for e in entries)
    assert all(e["energy"] == -e["score"] and e["score"] == sum(e["scores"]) / 2 for e in entries)
    best = min(entries, key=lambda e: e["energy"])
    assert result.ratios.as_tuple() == tuple(best["candidate"]) and result.score == best["score"]
    assert result.k == 1.0 and result.stop_reason == "max_iters" and result.computed == 5
    # The pipeline gets its own UNet back, with its dense weights bit for bit (the search never prunes it).
    assert loaded.pipe.unet is unet and attached_dual(unet) is None
    assert all(torch.equal(p, dense[n]) for n, p in unet.named_parameters())


def test_profile_roundtrips_with_search_metadata(tiny_readonly, tiny_scorer):
    settings = search_settings(RES, steps=2)  # a search's defaults: negative prompt "" as the reference
    result = search(tiny_readonly["tiny"], tiny_scorer, SearchPlan(PROMPTS[:1], settings, AnnealConfig(iters=1)))
    profile = result.profile("mine")
    back = Profile.from_dict(json.loads(json.dumps(profile.to_dict())), "mine.json")
    assert back == profile and back.family == "sd15" and back.resolution == RES
    assert back.extra["score"] == result.score and back.extra["k"] is None and back.extra["scored_k"] == 1.0
    assert back.extra["model"] == "tiny" and back.extra["scorer"] == "tiny" and back.extra["steps"] == 2
    assert back.extra["search"]["evaluations"] == 2 and back.extra["search"]["image_seeds"] == [24432]
    assert back.extra["search"]["negative_prompt"] == "" and back.extra["search"]["seed"] == 42
    assert "Specific CR-Diff" in back.source
    assert len(back.extra["prompts_sha256"]) == 64


def test_same_seed_same_search_and_seed_changes_it(tiny_readonly, tiny_scorer):
    runs = [search(tiny_readonly["tiny"], tiny_scorer, plan(iters=3, prompts=PROMPTS[:1], seed=s)) for s in (1, 1, 2)]
    as_dicts = [comparable([as_json(e) for e in r.history]) for r in runs]
    assert as_dicts[0] == as_dicts[1] != as_dicts[2]


# --- cache ------------------------------------------------------------------------------------------

def test_identical_candidates_are_scored_once(tiny_readonly, tiny_scorer):
    # Bounds this narrow make most moves clip to a bound, so candidates repeat.
    scorer = Counting(tiny_scorer)
    result = search(tiny_readonly["tiny"], scorer, plan(iters=12, bounds=(0.3, 0.31), prompts=PROMPTS[:1]))
    keys = [cache_key(e.record.candidate) for e in result.history]
    assert len(set(keys)) < len(keys)
    assert scorer.calls == len(set(keys)) == result.computed
    first = {}
    for e, key in zip(result.history, keys):
        if e.cached:
            assert e.record.energy == first[key].record.energy and e.seconds.get("generate") is None
        else:
            assert key not in first
            first[key] = e


# --- failures ---------------------------------------------------------------------------------------

class FailsOnPrompt:
    """A user scorer around the tiny one that raises whenever it is asked to score ``bad``'s image."""

    def __init__(self, inner, bad, name="tiny"):
        self.inner, self.bad, self.name, self.calls = inner, bad, name, 0

    def score(self, images, prompts):
        self.calls += 1
        if self.bad in prompts:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner.score(images, prompts)


def test_failing_prompt_scores_fail_score_others_keep_theirs_and_nothing_is_cached(tiny_readonly, tiny_scorer,
                                                                                   tmp_path):
    scorer = FailsOnPrompt(tiny_scorer, PROMPTS[1])
    result = search(tiny_readonly["tiny"], scorer, plan(iters=6, bounds=(0.3, 0.31), fail_score=-5.0),
                    journal=tmp_path / "j.jsonl")
    _, entries, _ = read_journal(tmp_path / "j.jsonl")
    assert all(e["error"] == "RuntimeError: CUDA out of memory (simulated)" for e in entries)
    assert all(e["scores"][1] == -5.0 and e["scores"][0] != -5.0 for e in entries)
    assert all(e["score"] == (e["scores"][0] - 5.0) / 2 and e["energy"] == -e["score"] for e in entries)
    # A candidate with a failure is not cached: its repeats (narrow bounds) are generated and scored again.
    keys = [cache_key(tuple(e["candidate"])) for e in entries]
    assert len(set(keys)) < len(keys) and not any(e["cached"] for e in entries)
    assert scorer.calls == 2 * len(entries) and result.failures == len(entries)  # one scorer call per image
    # The good prompt's score is the one it gets in a search where nothing fails.
    alone = search(tiny_readonly["tiny"], tiny_scorer, plan(iters=1, prompts=PROMPTS[:1]))
    assert entries[0]["scores"][0] == alone.history[0].score


def test_transient_failure_is_scored_again_when_the_candidate_returns(tiny_readonly, tiny_scorer):
    scorer = Counting(tiny_scorer, fail=lambda call: RuntimeError("CUDA out of memory (simulated)") if call == 1 else None)
    result = search(tiny_readonly["tiny"], scorer, plan(iters=6, bounds=(0.3, 0.31), prompts=PROMPTS[:1]))
    seed_again = [e for e in result.history[1:] if e.record.candidate == (0.3, 0.3, 0.3)]
    assert result.history[0].error and result.history[0].score == -2.0 and result.failures == 1
    assert seed_again and not seed_again[0].cached and seed_again[0].error is None and seed_again[0].score > 0


def test_non_finite_score_counts_as_failure(tiny_readonly, tiny_scorer):
    scorer = Counting(tiny_scorer, fail=lambda call: math.nan)
    result = search(tiny_readonly["tiny"], scorer, plan(iters=1, prompts=PROMPTS[:1]))
    assert all("non-finite" in e.error and e.score == -2.0 for e in result.history)


def test_generation_failure_is_recorded(load_tiny, tiny_scorer):
    # A VAE that cannot decode this latent shape makes generation itself raise, for every candidate.
    loaded = load_tiny("tiny")
    loaded.pipe.vae.decoder.conv_in = torch.nn.Conv2d(3, 16, 3, padding=1)
    result = search(loaded, tiny_scorer, plan(iters=1, prompts=PROMPTS[:1]))
    assert [e.score for e in result.history] == [-2.0, -2.0]
    assert all(e.error.startswith("RuntimeError") and "channels" in e.error for e in result.history)


def test_keyboard_interrupt_stops_the_search_and_resume_finishes_it(load_tiny, tiny_scorer, tmp_path):
    loaded = load_tiny("tiny")
    unet = loaded.pipe.unet
    stop = Counting(tiny_scorer, fail=lambda call: KeyboardInterrupt() if call == 3 else None)
    with pytest.raises(KeyboardInterrupt):
        search(loaded, stop, plan(iters=4, prompts=PROMPTS[:1]), journal=tmp_path / "j.jsonl")
    assert len(journal_lines(tmp_path / "j.jsonl")) == 1 + 2 and loaded.pipe.unet is unet
    resumed = search(loaded, Counting(tiny_scorer), plan(iters=4, prompts=PROMPTS[:1]), journal=tmp_path / "j.jsonl",
                     resume=True)
    full = search(loaded, tiny_scorer, plan(iters=4, prompts=PROMPTS[:1]), journal=tmp_path / "full.jsonl")
    assert comparable(read_journal(tmp_path / "j.jsonl")[1]) == comparable(read_journal(tmp_path / "full.jsonl")[1])
    assert resumed.ratios == full.ratios and resumed.score == full.score


# --- journal and resume -----------------------------------------------------------------------------

FULL = dict(iters=10, bounds=(0.3, 0.32), prompts=PROMPTS[:1], seed=0)


@pytest.fixture(scope="module")
def full_run(tiny_readonly, tiny_scorer, tmp_path_factory):
    """An uninterrupted 10-iteration search with repeats (narrow bounds) and two restarts, the second one
    on the last iteration, and its journal."""
    path = tmp_path_factory.mktemp("full") / "j.jsonl"
    result = search(tiny_readonly["tiny"], tiny_scorer, plan(**FULL), journal=path)
    return result, path


def test_full_run_has_restarts_and_equals_the_reference_loop(full_run):
    history = full_run[0].history
    assert [(e.number, e.record.iteration) for e in history if e.record.kind == "restart"] == [(7, 5), (13, 10)]
    # The reference loop fed with the scores this search measured makes the same candidates.
    scores = {cache_key(e.record.candidate): e.score for e in history if not e.cached}
    evaluations, best, best_score, stop = reference_search(lambda *r: scores[cache_key(r)], iterations=10,
                                                           lo=0.3, hi=0.32, rng_seed=0)
    assert [(e.record.kind, e.record.candidate) for e in history] == evaluations
    assert (full_run[0].ratios.as_tuple(), full_run[0].score, full_run[0].stop_reason) == (best, best_score, stop)


@pytest.mark.parametrize("cut", [0, 4, 5, 6, 11, 12])
def test_torn_last_line_is_cut_and_that_step_rerun(full_run, tiny_readonly, tiny_scorer, tmp_path, cut):
    result, full_path = full_run
    lines = full_path.read_bytes().split(b"\n")[:-1]
    torn = lines[cut + 1][: len(lines[cut + 1]) // 2] if cut + 1 < len(lines) else b""
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines[: cut + 1]) + torn)
    scorer = Counting(tiny_scorer)
    resumed = search(tiny_readonly["tiny"], scorer, plan(**FULL),
                     journal=path, resume=True)
    entries = read_journal(path)[1]
    assert comparable(entries) == comparable(read_journal(full_path)[1])
    assert len(journal_lines(path)) == len(lines)  # nothing lost, nothing doubled
    # Only uncached steps after the cut were computed again: the cache was rebuilt from the journal.
    assert scorer.calls == sum(not e["cached"] for e in entries[cut:])
    assert resumed.ratios == result.ratios and resumed.score == result.score


def test_full_run_has_cache_hits_after_every_cut(full_run):
    # Makes the torn-line test above meaningful: some repeats come after each cut point.
    history = full_run[0].history
    assert sum(e.cached for e in history[4:]) >= 1 and history[0].cached is False


def test_resume_of_finished_search_evaluates_nothing(full_run, tiny_readonly, tiny_scorer, tmp_path):
    result, full_path = full_run
    path = tmp_path / "j.jsonl"
    path.write_bytes(full_path.read_bytes())
    scorer = Counting(tiny_scorer)
    again = search(tiny_readonly["tiny"], scorer, plan(**FULL),
                   journal=path, resume=True)
    assert scorer.calls == 0 and path.read_bytes() == full_path.read_bytes()
    assert (again.ratios, again.score, again.stop_reason) == (result.ratios, result.score, result.stop_reason)


def test_damaged_journal_line_is_refused(full_run, tmp_path):
    lines = full_run[1].read_text().splitlines()
    lines[2] = lines[2][:40]
    path = tmp_path / "j.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CrdiffError, match="damaged at line 3"):
        read_journal(path)


@pytest.mark.parametrize("change, key", [
    (dict(prompts=PROMPTS), "the prompts differ"),
    (dict(seed=5), "anneal.seed"),
    (dict(image_seeds=(1, 2)), "image_seeds"),
    (dict(k=1.2), "k"),
])
def test_resume_refuses_a_different_search(full_run, tiny_readonly, tiny_scorer, tmp_path, change, key):
    path = tmp_path / "j.jsonl"
    path.write_bytes(full_run[1].read_bytes())
    kwargs = FULL | change
    with pytest.raises(CrdiffError, match=rf"different search \({key}[:.;)]"):
        search(tiny_readonly["tiny"], tiny_scorer, plan(**kwargs), journal=path, resume=True)


def not_journal_parent(tmp_path):
    """A file where a journal's folder should be."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def test_journal_existence_rules(full_run, tmp_path):
    identity = json.loads(full_run[1].read_text().splitlines()[0])["identity"]
    with pytest.raises(CrdiffError, match="already exists; continue that search with --resume"):
        check_journal(full_run[1], identity, resume=False, overwrite=False)
    assert check_journal(full_run[1], identity, resume=False, overwrite=True) == []
    with pytest.raises(CrdiffError, match="no journal at"):
        check_journal(tmp_path / "none.jsonl", identity, resume=True, overwrite=False)
    assert check_journal(tmp_path / "no" / "j.jsonl", identity, resume=False, overwrite=False) == []
    assert (tmp_path / "no").is_dir()  # a missing folder is made, as for every output
    with pytest.raises(CrdiffError, match="is not a folder"):
        check_journal(not_journal_parent(tmp_path) / "j.jsonl", identity, resume=False, overwrite=False)
    not_journal = tmp_path / "other.jsonl"
    not_journal.write_text('{"format": "something-else"}\n')
    with pytest.raises(CrdiffError, match="not a crdiff search journal"):
        check_journal(not_journal, identity, resume=True, overwrite=False)


# --- objectives -------------------------------------------------------------------------------------

def test_poa_scoring_and_k_search(tiny_readonly, tiny_scorer):
    loaded = tiny_readonly["tiny"]
    pruned = search(loaded, tiny_scorer, plan(iters=1, prompts=PROMPTS[:1]))
    poa = search(loaded, tiny_scorer, plan(iters=1, prompts=PROMPTS[:1], k=1.5))
    assert poa.k == 1.5 and poa.history[0].score != pruned.history[0].score
    assert poa.profile("p").extra["k"] == 1.5

    config = k_search_config(AnnealConfig(iters=6, seed=3), (1.0, 2.0), 1.5)
    assert config.seeds == ((0.3, 0.3, 0.3, 1.5),) and config.step_scale[3] == pytest.approx(1 / 0.7)
    k_plan = SearchPlan(PROMPTS[:1], GenerationSettings(RES, steps=2), config, search_k=True)
    found = search(loaded, tiny_scorer, k_plan)
    candidates = [e.record.candidate for e in found.history]
    assert all(len(c) == 4 and 1.0 <= c[3] <= 2.0 for c in candidates)
    assert len({c[3] for c in candidates}) > 1  # k really moves
    best = min(found.history, key=lambda e: e.record.energy).record.candidate
    assert (found.ratios.as_tuple(), found.k) == (best[:3], best[3]) and found.profile("p").extra["k"] == best[3]
    # The first step scores the same candidate as a fixed-k search at k = 1.5.
    assert found.history[0].score == poa.history[0].score


def test_plan_checks_coordinates():
    with pytest.raises(CrdiffError, match="needs 4"):
        SearchPlan(PROMPTS, GenerationSettings(RES), AnnealConfig(), search_k=True)
    with pytest.raises(CrdiffError, match="at least one prompt"):
        SearchPlan((), GenerationSettings(RES))
    with pytest.raises(CrdiffError, match="k_search_config"):
        SearchPlan(PROMPTS, GenerationSettings(RES), k_search_config(AnnealConfig()), k=1.2, search_k=True)
    with pytest.raises(CrdiffError, match="finite number >= 0"):
        SearchPlan(PROMPTS, GenerationSettings(RES), k=-1.0)
    with pytest.raises(CrdiffError, match="need a journal"):
        search(None, None, SearchPlan(PROMPTS, GenerationSettings(RES)), resume=True)


# --- trace and live view ----------------------------------------------------------------------------

def test_trace_png_draws_energy_best_and_temperature(full_run, tiny_readonly, tiny_scorer):
    from crdiff_cli.search.trace_plot import BLUE, GREY, HEIGHT, ORANGE, RED, WIDTH, trace_image

    failing = Counting(tiny_scorer, fail=lambda call: RuntimeError("x") if call == 2 else None)
    history = search(tiny_readonly["tiny"], failing, plan(iters=3, prompts=PROMPTS[:1])).history
    image = trace_image(history, "title")
    colors = {c for _, c in image.getcolors(WIDTH * HEIGHT)}
    assert image.size == (WIDTH, HEIGHT) and {BLUE, ORANGE, RED, GREY} <= colors
    single = trace_image(history[:1], "one step")  # a single point must not divide by zero
    assert BLUE in {c for _, c in single.getcolors(WIDTH * HEIGHT)}
    assert trace_image(full_run[0].history, "cached").size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("terminal", [False, True])
def test_live_view_on_and_off_a_terminal(full_run, terminal):
    from rich.console import Console

    from crdiff_cli.cli.search_view import SearchView

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200, color_system=None)
    history = full_run[0].history
    with SearchView(console, 10) as view:
        for e in history:
            view.update(e)
    text = buffer.getvalue()
    best = "/".join(f"{v:.4f}" for v in full_run[0].ratios.as_tuple())
    assert best in text and f"{history[-1].record.t:.5f}" in text
    if terminal:
        assert "crdiff search" in text and "\x1b[" in text  # redrawn in place
    else:
        lines = text.splitlines()
        assert len(lines) == len(history) and lines[-1].startswith("[13] 10/10 (restart)")
        assert [line.split("->")[1].split()[2:3] == ["cached"] for line in lines] == [e.cached for e in history]
