"""crdiff: CR-Diff (cross-resolution diffusion via network pruning) for diffusers UNets.

The public API, for a diffusers user::

    from crdiff_cli import apply_crdiff, remove_crdiff
    dual = apply_crdiff(pipe, "sd15@400x560", k=1.2)   # a profile, Ratios, a PruneSpec or "D/M/U"
    image = pipe("a lighthouse", height=400, width=560).images[0]
    remove_crdiff(pipe)                                # the plain UNet again, exactly as before

Layout (imports run one way: ``cli`` -> features -> core):

- core: :mod:`~crdiff_cli.pruning` (the rule, exact thresholds, profiles), :mod:`~crdiff_cli.storage`
  (safe outputs, journals), :mod:`~crdiff_cli.runtime` (ranks, malloc), ``errors``, ``defaults``,
  ``validation``;
- features: :mod:`~crdiff_cli.dual` (the live dual UNet and ``apply_crdiff``), :mod:`~crdiff_cli.pipelines`
  (loading, adapters, generating and writing images), :mod:`~crdiff_cli.search`,
  :mod:`~crdiff_cli.evaluation`, :mod:`~crdiff_cli.scorers`, :mod:`~crdiff_cli.exporters` (artifacts);
- :mod:`~crdiff_cli.cli`: the ``crdiff`` command, thin Typer commands over the above.

Names are re-exported lazily so that ``import crdiff_cli`` (and ``crdiff --help``) does not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "apply_crdiff": "crdiff_cli.dual.apply",
    "remove_crdiff": "crdiff_cli.dual.apply",
    "DualUNet": "crdiff_cli.dual.unet",
    "PoaPolicy": "crdiff_cli.dual.poa_policy",
    "Ratios": "crdiff_cli.pruning.ratios",
    "Resolution": "crdiff_cli.pruning.resolution",
    "PruneSpec": "crdiff_cli.pruning.spec",
    "PruneStats": "crdiff_cli.pruning.spec",
    "prune_": "crdiff_cli.pruning.spec",
    "default_target": "crdiff_cli.pruning.targets",
    "get_profile": "crdiff_cli.pruning.profile_table",
    "load_model": "crdiff_cli.pipelines.loading",
    "CrdiffError": "crdiff_cli.errors",
    "ParameterError": "crdiff_cli.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'crdiff_cli' has no attribute {name!r}")
