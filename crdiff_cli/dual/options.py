"""The dual UNet's two settings, checked without importing torch (commands check flags before loading).

``k``: the POA coefficient, ``e = e_d + k (e_p - e_d)``; ``masks``: how the pruned twin's weights are held
(``copy``: masked copies made once, fastest; ``on-the-fly``: made per layer per pass, no extra memory).
"""

from __future__ import annotations

import math

from crdiff_cli.errors import ParameterError

MASK_MODES = ("copy", "on-the-fly")


def check_k(k: float) -> str | None:
    """Validate the POA coefficient; returns a warning for unusually large values."""
    if not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ParameterError("k", k, "must be a finite number >= 0 (0 = dense, 1 = pruned, >1 amplifies; paper: 1.2-1.5)")
    return f"k = {k:g} is far above the paper's range (1.2-1.5); images may degrade" if k > 3 else None


def check_masks(masks: str) -> str:
    if masks not in MASK_MODES:
        raise ParameterError("masks", repr(masks), f"is not a mask mode; use one of {', '.join(MASK_MODES)}")
    return masks
