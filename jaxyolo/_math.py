"""Small numeric primitives with PyTorch's gradient conventions.

* ``clamp`` reproduces ``torch.clamp``'s gradient: it passes the incoming
  gradient where ``lo <= x <= hi`` (boundaries included) and zeroes it
  elsewhere.  ``jnp.clip``/``jnp.maximum`` split the gradient in half at a tie,
  which would differ from upstream on touching boxes and clamped targets.
* ``safe_div`` and ``atan_ratio`` use the "double where" trick: the unsafe
  denominator is replaced *before* dividing, so neither the value nor the
  gradient of a masked-out entry can be NaN/inf.  Where the denominator is
  non-zero they are bit-identical to plain division.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def clamp(x, lo=None, hi=None):
    """``torch.clamp(x, lo, hi)`` including its boundary-inclusive gradient."""
    if lo is not None:
        x = jnp.where(x >= lo, x, lo)
    if hi is not None:
        x = jnp.where(x <= hi, x, hi)
    return x


def safe_div(num, den, fill=0.0):
    """``num / den`` where ``den != 0``, ``fill`` (with zero gradient) elsewhere."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fill)


def atan_ratio(w, h):
    """``atan(w / h)`` as torch computes it, without NaN at ``h == 0``.

    torch gives ``±pi/2`` for ``h == 0, w != 0`` (``atan(±inf)``) and NaN for
    ``w == h == 0``; here the latter is ``0`` and both have zero gradient.
    """
    ok = h != 0
    return jnp.where(ok, jnp.arctan(w / jnp.where(ok, h, 1.0)), jnp.sign(w) * (math.pi / 2))
