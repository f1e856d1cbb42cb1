"""User-facing errors.

Anything the user can fix (bad flag value, missing file, wrong model) is raised as a
:class:`CrdiffError` with a one-line message that names the problem and the fix. The CLI prints that
line and exits with code 2, without a traceback; library users catch it like any exception.
"""


class CrdiffError(ValueError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2

    def __str__(self) -> str:
        # One line whatever the message quotes (a user's text, a library's multi-line error): line breaks
        # are shown escaped, so the message never spills onto a second line.
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")
