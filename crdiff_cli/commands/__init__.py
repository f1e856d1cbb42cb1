"""One module per CLI command; each registers itself on ``crdiff_cli.cli.app`` when imported."""
