"""Trace-time argument checks shared by every public function.

Everything here looks only at static information (shapes, dtypes, Python
values), so the checks run once while tracing under ``jax.jit`` and cost nothing
afterwards.  Errors name the argument and say what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def float_array(x, name: str) -> jnp.ndarray:
    """Return ``x`` as a floating array of at least float32.

    bf16/fp16 inputs are upcast (losses are computed in float32); float64 stays
    float64 when x64 is enabled.  Integer or boolean inputs are a ``TypeError``:
    boxes and logits must already be floating point.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.dtype.itemsize < 4:
        x = x.astype(jnp.float32)
    return x


def int_array(x, name: str) -> jnp.ndarray:
    """Return ``x`` as an integer array; floats and bools are a ``TypeError``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x


def bool_array(x, name: str) -> jnp.ndarray:
    """Return ``x`` as a boolean array; anything else is a ``TypeError``."""
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {x.dtype}")
    return x


def last_dim(x, size: int, name: str, what: str = "") -> None:
    """Require ``x.shape[-1] == size``."""
    if x.ndim == 0 or x.shape[-1] != size:
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have last dimension {size}{hint}, got shape {tuple(x.shape)}")


def ndim(x, n: int, name: str, layout: str) -> None:
    """Require ``x.ndim == n``; ``layout`` names the expected axes, e.g. ``"(B, M, 4)"``."""
    if x.ndim != n:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(x.shape)}")


def broadcast_batch(a, b, name_a: str, name_b: str) -> tuple[int, ...]:
    """Broadcast the leading (non-last) dimensions of two box arrays."""
    try:
        return tuple(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]))
    except ValueError:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} do not broadcast "
            "over their leading dimensions"
        ) from None


def choice(value, allowed: Sequence, name: str) -> None:
    """Require ``value in allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def positive_int(value, name: str) -> int:
    """Require a Python int > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def level_list(preds, name: str, layout: str) -> list:
    """Validate a per-level prediction list and return its levels as float32.

    ``preds`` must be a non-empty list/tuple (a sequence of arrays, one per
    level; a single stacked array is a ``TypeError`` because levels have
    different H, W).  ``layout`` names the per-level shape for the message,
    e.g. ``"(B, H, W, 5 + nc)"``.
    """
    if isinstance(preds, (jnp.ndarray, np.ndarray)) or not isinstance(preds, Sequence):
        raise TypeError(f"{name} must be a list/tuple (sequence) of per-level {layout} arrays, got {type(preds).__name__}")
    if len(preds) == 0:
        raise ValueError(f"{name} must hold at least one level of {layout}")
    return [float_array(p, f"{name}[{i}]").astype(jnp.float32) for i, p in enumerate(preds)]


def levels_agree(levels, name: str, channels: str) -> None:
    """Every level shares the batch size (axis 0) and channel count (last axis);
    ``channels`` names the channel layout for the message, e.g. ``"5 + nc"``."""
    b, c = levels[0].shape[0], levels[0].shape[-1]
    for i, p in enumerate(levels):
        if p.shape[0] != b:
            raise ValueError(f"{name}[{i}] has batch size {p.shape[0]} but {name}[0] has {b}; levels must share B")
        if p.shape[-1] != c:
            raise ValueError(
                f"{name}[{i}] has {p.shape[-1]} channels but {name}[0] has {c}; levels must share B and {channels}"
            )
