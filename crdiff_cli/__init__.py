"""crdiff: CR-Diff (cross-resolution diffusion via network pruning) for diffusers UNets.

The public API is re-exported lazily so that ``import crdiff_cli`` (and ``crdiff --help``) does not
import torch or diffusers.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "Ratios": "crdiff_cli.ratios",
    "Resolution": "crdiff_cli.resolution",
    "PruneSpec": "crdiff_cli.prune_spec",
    "PruneStats": "crdiff_cli.prune_spec",
    "prune_": "crdiff_cli.prune_spec",
    "load_model": "crdiff_cli.models",
    "get_profile": "crdiff_cli.profile_table",
    "CrdiffError": "crdiff_cli.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'crdiff_cli' has no attribute {name!r}")
