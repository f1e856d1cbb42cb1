"""`crdiff search` (placeholder until its issue lands)."""

from crdiff_cli.cli import app, command
from crdiff_cli.errors import CrdiffError


@app.command()
@command
def search():
    """(search: not implemented yet)"""
    raise CrdiffError("`crdiff search` is not implemented yet")
