"""User-facing errors.

Anything the user can fix (bad flag value, missing file, wrong model) is raised as a
:class:`CrdiffError` with a one-line message that names the problem and the fix. The CLI prints that
line and exits with code 2, without a traceback; library users catch it like any exception.
"""


import re
from collections.abc import Callable


class CrdiffError(ValueError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2

    def __str__(self) -> str:
        # One line whatever the message quotes (a user's text, a library's multi-line error): line breaks
        # are shown escaped, so the message never spills onto a second line.
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


def first_line(exc: Exception, limit: int = 200) -> str:
    """The first line of an exception's message, shortened at a word boundary (with an ellipsis)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,;:") + "..."


class ParameterError(CrdiffError):
    """A bad value of one named parameter, said in the caller's own words.

    A Python caller reads ``k=nan must be a finite number >= 0``; the CLI shows the same error with its
    flag, ``--k nan must be a finite number >= 0`` (:func:`crdiff_cli.cli.shared.command` renders it with
    :meth:`named`). ``mentions`` are other parameters the message names; they are renamed the same way.
    """

    def __init__(self, param: str, value, problem: str, *, mentions: tuple[str, ...] = ()):
        self.param, self.value, self.problem, self.mentions = param, value, problem, mentions
        super().__init__(self.named(lambda name: name, library=True))

    def __reduce__(self):  # picklable (ranks send errors to each other), with its parts
        return (_parameter_error, (self.param, self.value, self.problem, self.mentions))

    def named(self, name_of: Callable[[str], str], *, library: bool = False) -> str:
        """The message with every parameter name passed through ``name_of`` (e.g. to its ``--flag``)."""
        problem = self.problem
        for other in self.mentions:
            problem = re.sub(rf"\b{re.escape(other)}\b", name_of(other), problem)
        if self.value is None:
            return f"{name_of(self.param)} {problem}"
        return f"{name_of(self.param)}{'=' if library else ' '}{self.value} {problem}"


def _parameter_error(param, value, problem, mentions) -> ParameterError:
    return ParameterError(param, value, problem, mentions=mentions)

