"""`crdiff search` end to end on the tiny model: CliRunner runs, bad input, and the kill-and-resume test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.storage.journal import read_journal
from helpers import invoke

CRDIFF = Path(sys.executable).parent / "crdiff"  # the console script of the environment running the tests
BASE = ["--model", "tiny", "--res", "64x64", "--scorer", "tiny", "--steps", "2"]


def comparable(entries):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]


def test_search_writes_profile_trace_and_journal_usable_by_prune_and_generate(tiny_dirs, tmp_path):
    (tmp_path / "prompts.txt").write_text("# two prompts\na red cube\n\na lighthouse at night\n")
    result = invoke("search", *BASE, "--prompts", tmp_path / "prompts.txt", "--iters", "3",
                    "--image-seeds", "1,2", "--out", tmp_path / "best.json")
    assert result.exit_code == 0, result.output
    profile = json.loads((tmp_path / "best.json").read_text())
    assert profile["format"] == "crdiff-profile/1" and profile["family"] == "sd15" and profile["resolution"] == "64x64"
    assert profile["model"] == "tiny" and profile["scorer"] == "tiny" and profile["steps"] == 2
    assert profile["prompts"] == 2 and profile["search"]["image_seeds"] == [1, 2]
    # The reference's defaults: annealer seed 42, negative prompt "" (recorded with the ratios).
    assert profile["search"]["seed"] == 42 and profile["search"]["negative_prompt"] == ""
    header, entries, _ = read_journal(tmp_path / "best.journal.jsonl")
    assert header["identity"]["image_seeds"] == [1, 2] and len(entries) == 4
    assert header["identity"]["negative_prompt"] == "" and header["identity"]["anneal"]["seed"] == 42
    assert all(len(e["scores"]) == 4 for e in entries)  # 2 prompts x 2 image seeds
    best = min(entries, key=lambda e: e["energy"])
    assert list(profile["ratios"].values()) == best["candidate"] and profile["score"] == best["score"]
    assert Image.open(tmp_path / "best.trace.png").size == (900, 560)
    assert "best ratios" in result.stdout and "[4] 3/3" in result.stderr  # plain log lines off a terminal

    pruned = invoke("prune", "--model", "tiny", "--profile", tmp_path / "best.json", "--out", tmp_path / "pruned")
    assert pruned.exit_code == 0, pruned.output
    record = json.loads((tmp_path / "pruned" / "crdiff_prune.json").read_text())
    assert record["ratios"] == profile["ratios"] and "best" in record["ratios_origin"]
    images = invoke("generate", "--model", "tiny", "--res", "64x64", "--steps", "2", "--prompt", "a cube",
                    "--profile", tmp_path / "best.json", "--out", tmp_path / "images")
    assert images.exit_code == 0, images.output
    manifest = json.loads((tmp_path / "images" / "manifest.json").read_text())
    assert manifest["images"][0]["params"]["ratios"] == "/".join(f"{v:g}" for v in profile["ratios"].values())


def test_search_k_and_rules_through_the_cli(tiny_dirs, tmp_path):
    result = invoke("search", *BASE, "--prompt", "a cube", "--iters", "3", "--search-k", "--k", "1.2",
                    "--k-bounds", "1.0:1.6", "--rule", "t-floor", "--init", "0.3/0.3/0.3,0.5/0.2/0.4",
                    "--out", tmp_path / "k.json")
    assert result.exit_code == 0, result.output
    profile = json.loads((tmp_path / "k.json").read_text())
    _, entries, _ = read_journal(tmp_path / "k.journal.jsonl")
    assert [e["candidate"] for e in entries[:2]] == [[0.3, 0.3, 0.3, 1.2], [0.5, 0.2, 0.4, 1.2]]
    assert all(1.0 <= e["candidate"][3] <= 1.6 for e in entries)
    assert profile["search"]["search_k"] and profile["search"]["anneal"]["rule"] == "t-floor"
    assert profile["k"] == profile["scored_k"] == min(entries, key=lambda e: e["energy"])["candidate"][3]
    assert "Specific CR-Diff" in profile["source"]


def test_search_window_anneals_where_poa_stops_and_the_profile_records_it(tiny_dirs, tmp_path):
    result = invoke("search", *BASE, "--prompt", "a cube", "--iters", "3", "--k", "1.3", "--search-window",
                    "--window-bounds", "0.25:1.0", "--scheduler", "ddim", "--out", tmp_path / "w.json")
    assert result.exit_code == 0, result.output
    profile = json.loads((tmp_path / "w.json").read_text())
    header, entries, _ = read_journal(tmp_path / "w.journal.jsonl")
    assert entries[0]["candidate"][3] == 1.0  # starts at full POA
    assert all(len(e["candidate"]) == 4 and 0.25 <= e["candidate"][3] <= 1.0 for e in entries)
    best = min(entries, key=lambda e: e["energy"])
    assert PoaPolicy.from_dict(profile["poa"]) == PoaPolicy((0, best["candidate"][3]))
    assert profile["k"] == 1.3 and profile["search"]["search_window"] and header["identity"]["search_window"]
    assert "POA window 0:" in result.stdout


def test_existing_outputs_need_resume_or_overwrite(tiny_dirs, tmp_path):
    args = ["search", *BASE, "--prompt", "a cube", "--iters", "1", "--out", tmp_path / "p.json"]
    assert invoke(*args).exit_code == 0
    first = (tmp_path / "p.journal.jsonl").read_text()
    again = invoke(*args)
    assert again.exit_code == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    (tmp_path / "p.json").unlink()
    again = invoke(*args)
    assert again.exit_code == 2 and "journal" in again.stderr and "--resume" in again.stderr
    assert invoke(*args, "--resume").exit_code == 0  # finished: re-writes the profile, evaluates nothing
    assert (tmp_path / "p.journal.jsonl").read_text() == first
    assert invoke(*args, "--overwrite", "--seed", "4").exit_code == 0
    assert (tmp_path / "p.journal.jsonl").read_text() != first
    custom = invoke(*args, "--journal", tmp_path / "elsewhere.jsonl", "--overwrite")
    assert custom.exit_code == 0 and (tmp_path / "elsewhere.jsonl").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--bounds", "0.1:1.0"], "must lie in [0, 1)"),
    (["--bounds", "-0.1:0.5"], "must lie in [0, 1)"),
    (["--bounds", "0.5:0.4"], "LO < HI"),
    (["--bounds", "0.5"], "must be LO:HI"),
    (["--init", "0.05/0.3/0.3"], "lies outside --bounds"),
    (["--init", "0.3/0.3"], "three numbers"),
    (["--init", "0.3/0.3/0.3,x/0.3/0.3"], "three numbers"),
    (["--iters", "0"], "--iters 0: must be >= 1"),
    (["--alpha", "1"], "--alpha 1: must be in (0, 1)"),
    (["--alpha", "0"], "--alpha 0: must be in (0, 1)"),
    (["--t-init", "0"], "--t-init 0: must be > 0"),
    (["--restarts", "-1"], "--restarts -1"),
    (["--rule", "linear"], "choose patience or t-floor"),
    (["--scorer", "nope"], "unknown scorer 'nope'"),
    (["--image-seeds", "1,a"], "comma-separated integers"),
    (["--image-seeds", "1,1"], "repeats a seed"),
    (["--k", "-1"], "--k -1"),
    (["--search-k", "--k", "2.5"], "outside --k-bounds"),
    (["--search-k", "--k-bounds", "2:1"], "LO < HI"),
    (["--search-window"], "--search-window searches where POA runs; pass --k"),
    (["--search-window", "--k", "1.2", "--window-bounds", "0:1.5"], "must lie within (0, 1]"),
    (["--res", "63x64"], "not a multiple of 8"),
    (["--masks", "both"], "--masks"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--resume"], "no journal at"),
    (["--resume", "--overwrite"], "contradict"),
    (["--prompt", "two prompt flags"], "exactly one of --prompt"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, message):
    base = ["search", "--model", "tiny", "--res", "64x64", "--scorer", "tiny", "--prompt", "a cube",
            "--out", tmp_path / "p.json"]
    if "--prompt" in extra:
        base = [a for a in base if a not in ("--prompt", "a cube")] + ["--prompts", tmp_path / "none.txt"]
    if "--res" in extra:
        base = base[:3] + base[5:]
    result = invoke(*base, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "p.journal.jsonl").exists()


def test_missing_prompts_file_and_journal_mismatch(tiny_dirs, tmp_path):
    missing = invoke("search", *BASE, "--prompts", tmp_path / "none.txt", "--out", tmp_path / "p.json")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    assert invoke("search", *BASE, "--prompt", "a cube", "--iters", "1", "--out", tmp_path / "p.json").exit_code == 0
    for change, key in ((["--prompt", "a sphere"], "the prompts differ"), (["--prompt", "a cube", "--res", "64x56"],
                        "resolution"), (["--prompt", "a cube", "--model", "tiny-sdxl"], "model")):
        args = ["search", *BASE, "--iters", "1", "--out", tmp_path / "p.json", "--resume", *change]
        result = invoke(*args)
        assert result.exit_code == 2 and f"different search ({key}" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_journal_of_the_old_rule_is_refused_on_resume(tiny_dirs, tmp_path):
    args = ["search", *BASE, "--prompt", "a cube", "--iters", "1", "--out", tmp_path / "p.json"]
    assert invoke(*args).exit_code == 0
    journal = tmp_path / "p.journal.jsonl"
    lines = journal.read_text().splitlines()
    lines[0] = lines[0].replace("crdiff-search-journal/2", "crdiff-search-journal/1")
    journal.write_text("\n".join(lines) + "\n")
    old = journal.read_bytes()
    result = invoke(*args, "--resume")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "written by an older crdiff whose search rule differs (crdiff-search-journal/1)" in result.stderr
    assert "--overwrite" in result.stderr and journal.read_bytes() == old
    assert invoke(*args, "--overwrite").exit_code == 0  # starting afresh replaces it


# --- the crash test: SIGKILL mid-search, resume, compare with an uninterrupted run ---------------------

KILL_ARGS = [*BASE, "--prompts", "PROMPTS", "--iters", "14", "--bounds", "0.3:0.33", "--seed", "7"]


def cli_env(tiny_dirs) -> dict:
    return {**os.environ, "CRDIFF_CACHE": str(tiny_dirs["tiny"].parents[1]), "HF_HUB_OFFLINE": "1"}


def kill_when(journal: Path, lines: int, proc: subprocess.Popen) -> int:
    """SIGKILL ``proc`` as soon as ``journal`` has at least ``lines`` lines; returns the count then seen."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        seen = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if seen >= lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"search ended before the kill: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the journal never grew")


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_result(tiny_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na lighthouse at night\n")
    args = [str(prompts) if a == "PROMPTS" else a for a in KILL_ARGS]
    full = invoke("search", *args, "--out", tmp_path / "full.json")
    assert full.exit_code == 0, full.output
    full_entries = read_journal(tmp_path / "full.journal.jsonl")[1]
    assert len(full_entries) == 15

    killed = tmp_path / "killed.journal.jsonl"
    proc = subprocess.Popen([str(CRDIFF), "search", *args, "--out", str(tmp_path / "killed.json")],
                            env=cli_env(tiny_dirs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = kill_when(killed, 1 + 4, proc)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed.json").exists()
    durable = read_journal(killed)[1]
    assert 4 <= len(durable) < 15 and seen >= 1 + len(durable)
    assert comparable(durable) == comparable(full_entries[: len(durable)])

    resumed = subprocess.run([str(CRDIFF), "search", *args, "--out", str(tmp_path / "killed.json"), "--resume"],
                             env=cli_env(tiny_dirs), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # Resumed steps are logged from the journal's next step on: the durable ones were not redone.
    assert f"[{len(durable) + 1}] " in resumed.stderr and f"[{len(durable)}] " not in resumed.stderr
    assert f"resuming after step {len(durable)} (from the journal)" in resumed.stderr
    entries = read_journal(killed)[1]
    assert len(killed.read_text().splitlines()) == 1 + 15 == 1 + len(entries)  # nothing lost, nothing doubled
    assert [e["n"] for e in entries] == list(range(1, 16))
    assert comparable(entries) == comparable(full_entries)
    assert [e["candidate"] for e in entries] == [e["candidate"] for e in full_entries]
    # Repeats after the kill were answered from the cache rebuilt out of the journal.
    before = {tuple(e["candidate"]) for e in durable}
    assert any(e["cached"] and tuple(e["candidate"]) in before for e in entries[len(durable):])
    full_profile = json.loads((tmp_path / "full.json").read_text())
    resumed_profile = json.loads((tmp_path / "killed.json").read_text())
    assert {k: v for k, v in resumed_profile.items() if k != "name"} == \
        {k: v for k, v in full_profile.items() if k != "name"}


@pytest.mark.slow
def test_ctrl_c_stops_with_130_and_the_journal_resumes(tiny_dirs, tmp_path):
    args = [str(CRDIFF), "search", *BASE, "--prompt", "a cube", "--iters", "6", "--out", str(tmp_path / "p.json")]
    proc = subprocess.Popen(args, env=cli_env(tiny_dirs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "p.journal.jsonl"
    deadline = time.monotonic() + 600
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "search ended or stalled before the interrupt"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 130, stderr
    assert "add --resume to continue" in stderr and not (tmp_path / "p.json").exists()
    done = len(read_journal(journal)[1])
    assert 2 <= done < 8
    resumed = invoke("search", *BASE, "--prompt", "a cube", "--iters", "6", "--out", tmp_path / "p.json", "--resume")
    assert resumed.exit_code == 0, resumed.output
    entries = read_journal(journal)[1]  # the seed, 6 iterations and a restart (patience 5 of 6 iterations)
    assert [e["n"] for e in entries] == list(range(1, 9)) and entries[-1]["state"]["phase"] == "done"
