"""Running a command on many processes with ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc-per-node N -m crdiff_cli generate|search ...`` starts N copies of the command (and
``--nnodes``/``--rdzv-endpoint`` spreads them over machines). Each copy is a *rank*: it loads the
models once onto its own device, takes its share of the work items, and the results meet again in
item order on rank 0, which alone writes files and shows progress. Nothing here decides *what* is
computed, so a result never depends on how many ranks computed it: the caller keeps every item
self-contained (its own seeded generator) and combines the results in item order.

The API (a command calls :func:`start` once and passes the :class:`Ranks` it returns to the library)::

    ranks = start(device)                    # SINGLE without torchrun; never imports torch then
    ranks.device(device)                     # "cuda" -> "cuda:LOCAL_RANK" under torchrun
    ranks.on_main(fn)                        # fn() on rank 0 (files!); its value or CrdiffError on all
    ranks.broadcast(value)                   # rank 0's value on every rank
    ranks.split(items, work, combine)        # work(my share) everywhere; combine(results in item
                                             #   order) on rank 0; its value returned on every rank
    ranks.map(items, work, on_results=..., per_rank=B)
                                             # rounds of B items per rank; on_results(items, results)
                                             #   on rank 0 in item order: a driver loop's body

An evaluation driver, for example, needs only::

    ranks = start(device)
    todo = ranks.on_main(lambda: [i for i in work_items if i not in recorded])   # rank 0 reads records
    ranks.map(todo, lambda batch: score_batch(pipe, batch), per_rank=batch_size,
              on_results=lambda items, results: record(items, results))      # rank 0 writes them

Failures: an exception in one rank's ``work`` reaches every rank at the next exchange as a
:class:`RankError` naming the rank and the cause (:meth:`Ranks.map` turns it into a
:class:`RankFailure`, which stops the run); a rank that is killed, crashes or stops answering
surfaces as a :class:`RankFailure` on the others — from the backend (a closed connection, or the
collective timeout: ``CRDIFF_COLLECTIVE_TIMEOUT`` seconds, default 1800, longer than any step between
two exchanges), or from torchrun, which stops every other rank with SIGTERM when one fails. Rank 0
prints the one line; the other ranks print nothing at all (their consoles are quiet), and torchrun
then prints its own summary naming the failed rank and its exit code or signal.

Backends: NCCL when ``--device`` is CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU. Only Python
objects are exchanged (images, scores, error texts), a few per round, so the backend matters little.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crdiff_cli.errors import CrdiffError

DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "CRDIFF_COLLECTIVE_TIMEOUT"


class RankError(Exception):
    """A rank's work raised: every rank raises this at the same exchange, with the same message."""

    def __init__(self, rank: int, cause: str):
        super().__init__(f"{cause} (on rank {rank})")
        self.rank, self.cause = rank, cause


class RankFailure(CrdiffError):
    """The distributed run must stop: a rank failed, was killed, or stopped answering. Exit code 1."""

    exit_code = 1


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (an out-of-memory message runs over several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500]


def backend_cause(exc: BaseException) -> str:
    """The gist of a backend error: gloo's ``[.../pair.cc:537] Read error [addr]: Connection reset by peer.
    This is typically ...`` -> ``Read error [addr]: Connection reset by peer``."""
    text = " ".join(str(exc).split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:160] or type(exc).__name__


def blocks(items: Sequence, parts: int) -> list[Sequence]:
    """``items`` cut into ``parts`` contiguous blocks in order, sizes differing by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [r * size + min(r, extra) for r in range(parts + 1)]
    return [items[bounds[r]:bounds[r + 1]] for r in range(parts)]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; the single-process run is ``Ranks()`` (:data:`SINGLE`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> str:
        """The device this rank runs on: plain ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        return f"cuda:{self.local_rank}" if self.distributed and requested == "cuda" else requested

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""
        if not self.distributed:
            return value
        box = [value]
        self._collective(_dist().broadcast_object_list, box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (reading or checking files); its value, or its CrdiffError, on every rank."""
        if not self.distributed:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except CrdiffError as exc:
                outcome = ("error", exc)
        status, value = self.broadcast(outcome)
        if status == "error":
            raise value
        return value

    def split(self, items: Sequence, work: Callable[[Sequence], list],
              combine: Callable[[list], Any] = lambda results: results) -> Any:
        """``work(share)`` on every rank (contiguous shares, in order); ``combine(results)`` on rank 0.

        ``work`` returns one result per item of its share; ``combine`` sees all of them in item order, as
        one process would, and its value is returned on every rank. An exception in ``work`` or
        ``combine`` raises :class:`RankError` on every rank (in one process: the exception itself).
        """
        if not self.distributed:
            return combine(list(work(items)))
        share = blocks(items, self.world_size)[self.rank]
        try:
            mine = ("ok", list(work(share)) if share else [])
        except Exception as exc:  # noqa: BLE001 - sent to every rank, which then all stop together
            mine = ("error", describe(exc))
        gathered = [None] * self.world_size if self.is_main else None
        self._collective(_dist().gather_object, mine, gathered, dst=0)
        outcome = None
        if self.is_main:
            failed = next(((r, v) for r, (s, v) in enumerate(gathered) if s == "error"), None)
            if failed is None:
                try:
                    outcome = ("ok", combine([x for _, values in gathered for x in values]))
                except Exception as exc:  # noqa: BLE001
                    failed = (0, describe(exc))
            if failed is not None:
                outcome = ("error", failed)
        status, value = self.broadcast(outcome)
        if status == "error":
            raise RankError(*value)
        return value

    def map(self, items: Sequence, work: Callable[[Sequence], list], *,
            on_results: Callable[[Sequence, list], None] | None = None, per_rank: int = 1) -> None:
        """All of ``items`` in rounds of ``per_rank`` items per rank; ``on_results`` on rank 0, in order.

        A round costs one exchange; a round waits for its slowest rank. Any rank's exception stops the
        run: :class:`RankFailure` on every rank (in one process: the exception itself).
        """
        chunk = max(1, per_rank) * self.world_size
        for start in range(0, len(items), chunk):
            round_items = items[start:start + chunk]

            def combine(results, round_items=round_items):
                if on_results is not None:
                    on_results(round_items, results)

            try:
                self.split(round_items, work, combine)
            except RankError as exc:
                raise RankFailure(f"rank {exc.rank} failed: {exc.cause}") from None

    def _collective(self, op, *args, **kwargs) -> None:
        """Run one collective; a lost or silent peer becomes :class:`RankFailure`."""
        try:
            op(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - backend errors have no common type (gloo, NCCL, timeout)
            _quiet_sigterm()  # torchrun's SIGTERM may follow: this rank has already said why it stops
            raise RankFailure(f"rank {self.rank} lost contact with the other ranks ({backend_cause(exc)}): "
                              "a rank was killed, crashed or hung; torchrun's summary names it") from None


SINGLE = Ranks()


def _dist():
    import torch.distributed as dist

    return dist


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CrdiffError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None


def start(device: str, *, quiet: Callable[[], None] | None = None) -> Ranks:
    """Join the torchrun process group (once per process); :data:`SINGLE` outside torchrun.

    ``device`` picks the backend: NCCL for CUDA, gloo otherwise. ``quiet`` is called on every rank but
    rank 0 (the CLI silences its consoles there). A SIGTERM — torchrun stopping the survivors after one
    rank failed — raises :class:`RankFailure`, so rank 0 says so in one line instead of dying silently.
    """
    env = torchrun_env()
    if env is None or env[1] == 1:
        return SINGLE
    rank, world_size, local_rank = env
    ranks = Ranks(rank, world_size, local_rank)
    if not ranks.is_main and quiet is not None:
        quiet()
    if device.startswith("cuda:"):
        raise CrdiffError(f"--device {device}: under torchrun pass --device cuda; rank r then uses cuda:LOCAL_RANK")
    dist = _dist()
    if not dist.is_initialized():
        import datetime
        import signal

        import torch

        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            raise CrdiffError(f"{TIMEOUT_ENV} must be a number of seconds") from None
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout))
        signal.signal(signal.SIGTERM, _stopped)
        import atexit

        atexit.register(_leave)
    return ranks


def _quiet_sigterm() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stopped(signum, frame):
    _quiet_sigterm()  # a second SIGTERM (e.g. while exiting) ends the process without another message
    raise RankFailure("stopped: another rank failed or was killed (torchrun's summary names it)")


def _leave() -> None:
    _quiet_sigterm()
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()
