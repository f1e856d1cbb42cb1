"""torchrun end to end (CPU, gloo, 2 real processes, tiny models): the same files, profile and journal as one
process; a failed or killed rank stops the run with one line, and the journal resumes to the same result.

Every run here, torchrun's and the single-process baseline, has OMP_NUM_THREADS=1 (torchrun sets it for its
workers): on a CPU, float results depend on the number of threads a kernel splits its work into.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crdiff_cli.runtime.distributed import SINGLE, backend_cause, blocks
from crdiff_cli.storage.journal import read_journal

SEARCH = ["search", "--model", "tiny", "--res", "32x32", "--scorer", "tiny", "--steps", "1", "--image-seeds", "1,2,3",
          "--iters", "7", "--bounds", "0.3:0.33", "--seed", "7"]

pytestmark = pytest.mark.slow  # real torchrun processes: the slow tier (docs/testing.md)


def env(tiny_dirs) -> dict:
    """The children's environment. TMPDIR inside the session cache: torchrun leaves a ``torchelastic_*``
    log folder in the temporary directory on every launch, and the session cache is removed at the end."""
    cache = tiny_dirs["tiny"].parents[1]
    (cache / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "CRDIFF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TMPDIR": str(cache / "tmp")}


def torchrun_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *[str(a) for a in args]]


def single(tiny_dirs, *args):
    return subprocess.run([sys.executable, "-m", "crdiff_cli", *[str(a) for a in args]], env=env(tiny_dirs),
                          capture_output=True, text=True)


def torchrun(tiny_dirs, *args):
    return subprocess.run(torchrun_cmd("-m", "crdiff_cli", *args), env=env(tiny_dirs), capture_output=True, text=True)


def comparable(entries):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]


def crdiff_lines(stderr: str) -> list[str]:
    """What crdiff itself printed on stderr (torchrun's own log and summary left out)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "warning:", "["))
            and not line.startswith("[rank")]


# --- the library, in one process ----------------------------------------------------------------------

def test_blocks_are_contiguous_in_order_and_balanced():
    assert blocks(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert blocks(list(range(2)), 4) == [[0], [1], [], []]
    assert [len(b) for b in blocks(list(range(10)), 4)] == [3, 3, 2, 2]
    assert sum(blocks(list(range(7)), 3), []) == list(range(7))


def test_single_process_calls_work_and_combine_directly():
    assert SINGLE.split([1, 2, 3], lambda share: [x * 2 for x in share], sum) == 12
    seen = []
    SINGLE.map([1, 2, 3], lambda batch: [x + 1 for x in batch], on_results=lambda i, r: seen.append((list(i), r)),
               per_rank=2)
    assert seen == [([1, 2], [2, 3]), ([3], [4])]
    with pytest.raises(ZeroDivisionError):  # one process: the exception itself, as before
        SINGLE.map([0], lambda batch: [1 / x for x in batch])
    assert SINGLE.device("cuda") == "cuda" and SINGLE.on_main(lambda: 5) == 5 and SINGLE.broadcast(3) == 3


def test_backend_cause_keeps_the_gist_of_a_gloo_error():
    error = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8069: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging or bugs ")
    assert backend_cause(error) == "Read error [127.0.0.1]:8069: Connection reset by peer"


# --- the library under torchrun -----------------------------------------------------------------------

WORKER = '''
import json, sys
from crdiff_cli.runtime.distributed import RankFailure, start
from crdiff_cli.errors import CrdiffError

ranks = start("cpu")
out = {"rank": ranks.rank, "world": ranks.world_size, "device": ranks.device("cuda")}
out["split"] = ranks.split(list(range(5)), lambda share: [(x, ranks.rank) for x in share],
                           lambda results: [list(r) for r in results])
out["broadcast"] = ranks.broadcast("from 0" if ranks.is_main else "from 1")
try:
    ranks.on_main(lambda: (_ for _ in ()).throw(CrdiffError("rank 0 found a bad file")))
except CrdiffError as exc:
    out["on_main"] = str(exc)
written = []
def work(batch):
    if ranks.rank == 1 and batch[0] >= 4:
        raise MemoryError("out of memory\\non rank 1")
    return [x * x for x in batch]
try:
    ranks.map(list(range(8)), work, on_results=lambda items, results: written.append(results), per_rank=2)
except RankFailure as exc:
    out["map"] = str(exc)
out["written"] = written
with open(sys.argv[1] + f"/rank{ranks.rank}.json", "w") as f:
    json.dump(out, f)
'''


def test_ranks_split_broadcast_and_stop_together_under_torchrun(tiny_dirs, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    run = subprocess.run(torchrun_cmd(tmp_path / "worker.py", tmp_path), env=env(tiny_dirs), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r0["device"], r1["device"]) == (2, "cuda:0", "cuda:1")
    # items 0-2 on rank 0, 3-4 on rank 1, every result in item order on both ranks
    assert r0["split"] == r1["split"] == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 1]]
    assert r0["broadcast"] == r1["broadcast"] == "from 0"
    assert r0["on_main"] == r1["on_main"] == "rank 0 found a bad file"
    # round 1: items 0-1 on rank 0, 2-3 on rank 1, written by rank 0; round 2: rank 1 raises, both ranks stop
    assert r0["map"] == r1["map"] == "rank 1 failed: MemoryError: out of memory on rank 1"
    assert r0["written"] == [[0, 1, 4, 9]] and r1["written"] == []


# --- the commands under torchrun ----------------------------------------------------------------------

def test_generate_under_torchrun_writes_the_files_of_one_process(tiny_dirs, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cube\na lighthouse at night\n")
    args = ["generate", "--model", "tiny", "--res", "32x32", "--steps", "2", "--prompts", tmp_path / "prompts.txt",
            "-n", "3", "--compare", "--seed", "5"]
    one = single(tiny_dirs, *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(tiny_dirs, *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) == 2 * 3 * 2 + 2 + 1  # images (CR-Diff and dense), two grids, the manifest
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    # one progress bar and one summary line, from rank 0 only
    assert two.stdout.count("wrote 12 images") == 1 and two.stderr.count("images") == 1


@pytest.fixture(scope="module")
def single_search(tiny_dirs, tmp_path_factory):
    """The single-process search every torchrun search here must reproduce: (profile, journal entries)."""
    folder = tmp_path_factory.mktemp("single")
    (folder / "prompts.txt").write_text("a red cube\na lighthouse at night\n")
    run = single(tiny_dirs, *SEARCH, "--prompts", folder / "prompts.txt", "--out", folder / "best.json")
    assert run.returncode == 0, run.stderr
    return json.loads((folder / "best.json").read_text()), read_journal(folder / "best.journal.jsonl")[1]


def test_search_under_torchrun_gives_the_profile_and_journal_of_one_process(tiny_dirs, tmp_path, single_search):
    (tmp_path / "prompts.txt").write_text("a red cube\na lighthouse at night\n")
    run = torchrun(tiny_dirs, *SEARCH, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "best.json")
    assert run.returncode == 0, run.stderr
    profile, entries = single_search
    assert json.loads((tmp_path / "best.json").read_text()) == profile
    # the seed, 7 iterations and the reference rule's restart step (after iteration 5)
    assert len(entries) == 9 and comparable(read_journal(tmp_path / "best.journal.jsonl")[1]) == comparable(entries)
    assert all(len(e["scores"]) == 6 for e in entries)  # 2 prompts x 3 image seeds: 3 images per rank
    assert (tmp_path / "best.trace.png").is_file()
    # rank 0 alone logs: each step once
    assert [line.split()[0] for line in crdiff_lines(run.stderr)] == [f"[{n}]" for n in range(1, len(entries) + 1)]


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=``rank`` (a child of the launcher)."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


def kill_rank_1(tiny_dirs, args, journal: Path, lines: int) -> None:
    """Run the command ``args`` under torchrun and SIGKILL rank 1 (as the kernel's OOM killer would) once
    ``journal`` has ``lines`` lines; the run must stop with one error line from rank 0 saying how to resume,
    and torchrun's summary must name the rank and the signal."""
    proc = subprocess.Popen(torchrun_cmd("-m", "crdiff_cli", *args), env=env(tiny_dirs), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
        time.sleep(0.01)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode != 0
    errors = [line for line in crdiff_lines(stderr) if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "add --resume to continue" in errors[0] and ("lost contact" in errors[0] or "stopped" in errors[0])
    assert "rank      : 1" in stderr and "SIGKILL" in stderr


def test_a_killed_rank_stops_the_search_in_one_line_and_resume_completes_it(tiny_dirs, tmp_path, single_search):
    (tmp_path / "prompts.txt").write_text("a red cube\na lighthouse at night\n")
    args = [*SEARCH, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "best.json"]
    journal = tmp_path / "best.journal.jsonl"
    kill_rank_1(tiny_dirs, args, journal, 1 + 3)
    assert not (tmp_path / "best.json").exists()
    durable = read_journal(journal)[1]
    profile, entries = single_search
    assert 3 <= len(durable) < len(entries) and comparable(durable) == comparable(entries[:len(durable)])

    resumed = torchrun(tiny_dirs, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_journal(journal)[1]) == comparable(entries)
    assert json.loads((tmp_path / "best.json").read_text()) == profile


# --- evaluate under torchrun --------------------------------------------------------------------------

EVALUATE = ["evaluate", "--model", "tiny", "--res", "32x32", "--steps", "1", "--metrics", "tiny", "-n", "2",
            "--batch-size", "2", "--seed", "3"]
EVALUATE_FILES = ("scores.jsonl", "results.csv", "results.json", "paired.csv")


def evaluate_args(folder: Path, out: Path) -> list:
    (folder / "prompts.txt").write_text("a red cube\na lighthouse at night\na green apple\n")
    return [*EVALUATE, "--prompts", folder / "prompts.txt", "--out", out]


def evaluation_files(out: Path) -> dict[str, bytes]:
    """Every image and the results files of an evaluation, by path (report.html's inline charts included)."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}
    return {**files, **{name: (out / name).read_bytes() for name in (*EVALUATE_FILES, "report.html")}}


@pytest.fixture(scope="module")
def single_evaluation(tiny_dirs, tmp_path_factory) -> dict[str, bytes]:
    """The single-process evaluation every torchrun evaluation here must reproduce, by path: 3 variants x
    3 prompts x 2 seeds = 18 images in 9 batches of 2 (5 rounds of 2 ranks, the last with one batch)."""
    folder = tmp_path_factory.mktemp("single-evaluate")
    run = single(tiny_dirs, *evaluate_args(folder, folder / "out"))
    assert run.returncode == 0, run.stderr
    return evaluation_files(folder / "out")


def test_evaluate_under_torchrun_writes_the_files_of_one_process(tiny_dirs, tmp_path, single_evaluation):
    run = torchrun(tiny_dirs, *evaluate_args(tmp_path, tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    files = evaluation_files(tmp_path / "out")
    assert len([name for name in files if name.endswith(".png")]) == 18
    # images, scores.jsonl (the same lines in the same order), results, paired comparisons: byte for byte
    assert files.keys() == single_evaluation.keys()
    for name in files:
        assert files[name] == single_evaluation[name], name
    # one progress bar and one summary from rank 0 only
    assert run.stdout.count("wrote 18 images") == 1 and run.stderr.count("images") == 1


def test_evaluate_resumes_a_single_process_run_with_two_ranks(tiny_dirs, tmp_path, single_evaluation):
    """A one-process run stopped after 4 of its 9 batches (as a kill leaves it: the next batch's images
    written, its records not), resumed by 2 ranks: the files of an uninterrupted run."""
    out = tmp_path / "out"
    out.mkdir()
    lines = single_evaluation["scores.jsonl"].splitlines(keepends=True)
    (out / "scores.jsonl").write_bytes(b"".join(lines[:1 + 4 * 2]))  # header + 4 batches of 2 images x 1 metric
    for name, data in single_evaluation.items():
        if name.endswith(".png") and "/crdiff/" not in name:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
    run = torchrun(tiny_dirs, *evaluate_args(tmp_path, out), "--resume")
    assert run.returncode == 0, run.stderr
    assert evaluation_files(out) == single_evaluation


def test_a_killed_rank_stops_the_evaluation_in_one_line_and_one_process_resumes_it(tiny_dirs, tmp_path,
                                                                                   single_evaluation):
    out = tmp_path / "out"
    args = evaluate_args(tmp_path, out)
    scores = out / "scores.jsonl"
    kill_rank_1(tiny_dirs, args, scores, 1 + 2)  # header and the first batch
    assert not (out / "results.csv").exists()
    durable = scores.read_bytes().splitlines(keepends=True)
    expected = single_evaluation["scores.jsonl"].splitlines(keepends=True)
    assert 3 <= len(durable) < len(expected) and durable == expected[:len(durable)]

    resumed = single(tiny_dirs, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert evaluation_files(out) == single_evaluation
