"""`crdiff bake` (placeholder until its issue lands)."""

from crdiff_cli.cli import app, command
from crdiff_cli.errors import CrdiffError


@app.command()
@command
def bake():
    """(bake: not implemented yet)"""
    raise CrdiffError("`crdiff bake` is not implemented yet")
