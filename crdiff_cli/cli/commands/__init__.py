"""One module per CLI command; :mod:`crdiff_cli.cli` registers their functions on its Typer app."""
