"""Small numeric primitives with PyTorch's gradient conventions.

* ``clamp`` reproduces ``torch.clamp``'s gradient: it passes the incoming
  gradient where ``lo <= x <= hi`` (boundaries included) and zeroes it
  elsewhere.  ``jnp.clip``/``jnp.maximum`` split the gradient in half at a tie,
  which would differ from upstream on touching boxes and clamped targets.
* ``safe_div`` and ``atan_ratio`` use the "double where" trick: the unsafe
  denominator is replaced *before* dividing, so neither the value nor the
  gradient of a masked-out entry can be NaN/inf.  Where the denominator is
  non-zero they are bit-identical to plain division.
* ``nan_if`` poisons a loss with NaN in its value *and* its gradients (a
  ``jnp.where(cond, nan, x)`` would leave the gradients at exactly 0, which a
  loop that checks only gradients would silently train on).
* ``clamp_keep_nan`` bounds an overflow-prone input (YOLOX's ``exp`` decode)
  while letting NaN through, so a NaN prediction is never turned into a
  plausible number.
"""

from __future__ import annotations

import math

import jax
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


@jax.custom_jvp
def atan_ratio(w, h):
    """``atan(w / h)`` as torch computes it, without NaN or inf.

    Values: torch gives ``±pi/2`` for ``h == 0, w != 0`` (``atan(±inf)``) and
    NaN for ``w == h == 0``; here the latter is ``0``.

    Gradients use ``d atan(w/h) = (h dw - w dh) / (w**2 + h**2)`` evaluated on
    ``(w, h)`` scaled by ``max(|w|, |h|)``, so they stay finite where the
    textbook chain rule overflows (``h**2`` underflowing for boxes of size
    ~1e-20) and equal it to float32 rounding elsewhere.  At ``w == h == 0`` the
    gradient is 0.
    """
    ok = h != 0
    return jnp.where(ok, jnp.arctan(w / jnp.where(ok, h, 1.0)), jnp.sign(w) * (math.pi / 2))


@atan_ratio.defjvp
def _atan_ratio_jvp(primals, tangents):
    w, h = primals
    dw, dh = tangents
    scale = jnp.maximum(jnp.abs(w), jnp.abs(h))
    ok = scale > 0
    scale = jnp.where(ok, scale, 1.0)
    ws, hs = w / scale, h / scale
    inv = 1.0 / (scale * (ws * ws + hs * hs))
    inv = jnp.where(ok & jnp.isfinite(inv), inv, 0.0)  # primal-only mask: transposable
    return atan_ratio(w, h), (hs * inv) * dw - (ws * inv) * dh


def nan_if(cond, x):
    """``x`` where ``cond`` is False; NaN with NaN gradients where it is True.

    ``x * where(cond, nan, 1)``: bit-identical to ``x`` when ``cond`` is False
    (the gradient is the incoming one times exactly 1), and the cotangent of
    every input of ``x`` becomes NaN when ``cond`` is True.
    """
    x = jnp.asarray(x)
    return x * jnp.where(cond, jnp.nan, 1.0).astype(x.dtype)


def clamp_keep_nan(x, lo=None, hi=None):
    """:func:`clamp` that propagates NaN (as ``torch.clamp``) instead of mapping
    it to ``lo``; ``±inf`` are clamped.  Zero gradient outside ``[lo, hi]``."""
    if lo is not None:
        x = jnp.where(x < lo, lo, x)
    if hi is not None:
        x = jnp.where(x > hi, hi, x)
    return x
