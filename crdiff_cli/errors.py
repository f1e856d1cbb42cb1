"""User-facing errors.

Anything the user can fix (bad flag value, missing file, wrong model) is raised as a
:class:`CrdiffError` with a one-line message that names the problem and the fix. The CLI prints that
line and exits with code 2, without a traceback; library users catch it like any exception.
"""


class CrdiffError(ValueError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2
