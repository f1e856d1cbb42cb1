"""Table 6 of the CR-Diff paper as data: one JSON file per (model family, resolution).

The files are read by :mod:`crdiff_cli.pruning.profile_table`; this package exists so that an installed
wheel ships them as package data (``importlib.resources.files("crdiff_cli.profiles")``).
"""
