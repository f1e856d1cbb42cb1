"""Every default crdiff uses, defined once: the library's signatures, the CLI's flags and the docs read these.

``K``: the POA coefficient of the paper's reference code (its examples also use 1.2); ``STEPS``,
``GUIDANCE``: the reference search's sampling settings and Stable Diffusion's usual ones; ``MASKS``: how the
pruned twin is held (``copy`` is the fastest, see :mod:`crdiff_cli.dual.unet`).
"""

K = 1.5
STEPS = 30
GUIDANCE = 7.5
MASKS = "copy"
