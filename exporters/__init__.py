"""Artifact writers and readers for baked dual UNets (installed as ``crdiff_cli.exporters``)."""
