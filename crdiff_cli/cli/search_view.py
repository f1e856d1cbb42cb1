"""The live view of a running search: iteration, temperature, current and best candidate.

On a terminal it is a rich ``Live`` panel redrawn after every step. Anywhere else (a log file, CI,
Typer's CliRunner) live redrawing would only produce escape codes or nothing, so the same facts are
printed as one plain line per step instead: a readable log of the run.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _vector(values) -> str:
    return "/".join(f"{v:.4f}" for v in values)


class SearchView:
    """Call :meth:`update` with each :class:`crdiff_cli.search.runner.SearchStep`; use as a context manager."""

    def __init__(self, console: Console, iters: int, label: str = "D/M/U"):
        self.console, self.iters, self.label = console, iters, label  # label: the candidate's coordinates
        self.live = Live(console=console, auto_refresh=False, transient=False) if console.is_terminal else None
        self.computed = self.cached = self.failed = 0
        self.started = time.monotonic()

    def __enter__(self) -> "SearchView":
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, evaluation) -> None:
        self.cached += evaluation.cached
        self.computed += not evaluation.cached
        self.failed += evaluation.error is not None and not evaluation.cached
        if self.computed + self.cached == 1 and evaluation.number > 1:
            self.console.print(f"resuming after step {evaluation.number - 1} (from the journal)", highlight=False)
        if self.live is not None:
            self.live.update(self._table(evaluation), refresh=True)
        else:
            self.console.print(self._line(evaluation), highlight=False, markup=False)

    def _facts(self, e) -> dict[str, str]:
        r, s = e.record, e.record.state
        step = f"seed {r.iteration + 1}" if r.kind == "seed" else f"{r.iteration}/{self.iters} ({r.kind})"
        outcome = f"{-r.energy:.4f}" + (" cached" if e.cached else "") + (f" FAILED: {e.error}" if e.error else "")
        return {"iteration": step, "T": f"{r.t:.5f}",
                "candidate": f"{self.label} {_vector(r.candidate)} -> score {outcome}",
                "current": f"{_vector(s.current)}  score {-s.e_current:.4f}" + ("" if r.accepted else "  (rejected)"),
                "best": f"{_vector(s.best)}  score {-s.e_best:.4f}",
                "evaluations": f"{self.computed} scored, {self.cached} cached, {self.failed} failed, "
                               f"reheats {s.reheats}, restarts {s.restarts}, {time.monotonic() - self.started:.0f}s"}

    def _table(self, evaluation) -> Table:
        table = Table(title="crdiff search", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in self._facts(evaluation).items():
            table.add_row(key, value)
        return table

    def _line(self, evaluation) -> str:
        f = self._facts(evaluation)
        return f"[{evaluation.number}] {f['iteration']}  T {f['T']}  {f['candidate']}  best {f['best']}"
