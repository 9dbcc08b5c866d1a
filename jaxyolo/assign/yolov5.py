"""YOLOv5's anchor-ratio matcher (``ComputeLoss.build_targets``) with static shapes.

Upstream (yolov5 7.0 ``utils/loss.py``) filters a flat ``(N, 6)`` target list
with boolean indexing, so its outputs have data-dependent length.  Here every
*candidate* slot is kept and flagged with a mask instead.  Per level there are
``5 * na * B * M`` slots laid out as ``(5, na, B, M)``:

* axis 0, the offset ``o`` in upstream's order ``[own cell, left, up, right, down]``
  (offsets ``(0, 0), (+.5, 0), (0, +.5), (-.5, 0), (0, -.5)`` subtracted from the
  centre before truncation);
* axis 1, the anchor ``a``;
* axes 2-3, the target, image by image and in slot order, which is the row order
  of ``targets.to_rows()``.

Flattening a ``(5, na, B, M)`` array in C order therefore lists the candidates
in exactly upstream's output order (offset-major, then anchor, then target), so
``mask``-compacting it on the host reproduces upstream's lists row for row.  The
losses use the flat position as the *candidate order id* to resolve duplicate
cells the way torch's serial ``index_put`` does (see
:func:`jaxyolo.objectives.yolov5.yolov5_loss`).

Matching rules, reproduced exactly (float32, same operation order as upstream):

* ``r = gwh / anchor`` (grid units); a (target, anchor) pair matches when
  ``max(r, 1 / r)`` over w and h is **strictly** below ``anchor_t``.  Padded
  rows and zero-size boxes never match.
* the own cell always; the left/up neighbour when ``gxy % 1 < 0.5 and gxy > 1``;
  the right/down neighbour when ``gxi % 1 < 0.5 and gxi > 1`` with
  ``gxi = (W, H) - gxy``.  A centre on an integer cell border therefore gets both
  neighbours on that axis; a fractional part of exactly 0.5 gets neither.
* ``gij = trunc(gxy - offset)`` (``.long()`` truncates toward zero), then clamped
  to ``[0, W-1] x [0, H-1]``.
* **Quirk** (upstream's in-place ``clamp_``): ``gi, gj`` are views of ``gij``, so
  clamping them also changes ``gij`` and the box target is
  ``tbox_xy = gxy - clamped gij``.  A centre at ``x = 1.0`` (``gx = W``) gets cell
  ``W - 1`` and ``tbox_x = 1.0``, not ``0.0`` in a cell outside the grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo import _checks
from jaxyolo.targets import Targets

__all__ = [
    "Yolov5LevelTargets",
    "yolov5_build_targets",
    "build_targets_stacked",
    "YOLOV5_OFFSETS",
    "yolov5_anchors_and_strides",
]

#: Upstream's neighbour offsets (``off * g`` with ``g = 0.5``), subtracted from
#: the grid centre before truncation: own cell, left, up, right, down.
YOLOV5_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Yolov5LevelTargets:
    """Candidate training targets of one level; every array leads with ``(5, na, B, M)``.

    Attributes:
      mask: ``(5, na, B, M)`` bool, the slot is a positive (upstream keeps it).
      image: ``(5, na, B, M)`` int32 image index ``b``.
      anchor: ``(5, na, B, M)`` int32 anchor index ``a``.
      gj, gi: ``(5, na, B, M)`` int32 cell row / column, clamped to the grid.
      tbox: ``(5, na, B, M, 4)`` float32 box target in grid units:
        ``(gx - gi, gy - gj, gw, gh)`` (centre relative to the clamped cell).
      anchor_wh: ``(5, na, B, M, 2)`` float32 anchor size in grid units.
      classes: ``(5, na, B, M)`` int32 class id.

    Values in slots where ``mask`` is False are unspecified-but-finite (the
    loss never reads them unmasked).  :func:`build_targets_stacked` returns the
    same fields with an extra leading level axis ``L``.
    """

    mask: jax.Array
    image: jax.Array
    anchor: jax.Array
    gj: jax.Array
    gi: jax.Array
    tbox: jax.Array
    anchor_wh: jax.Array
    classes: jax.Array

    def flat(self) -> Yolov5LevelTargets:
        """The same targets with the candidate axes ``(5, na, B, M)`` flattened to
        ``(K,)``, ``K = 5 * na * B * M`` (any leading axes, e.g. levels, are kept);
        position = upstream order id."""
        lead = self.mask.ndim
        return jax.tree_util.tree_map(lambda x: x.reshape(x.shape[: lead - 4] + (-1,) + x.shape[lead:]), self)

    def rows(self) -> np.ndarray:
        """Host-side: the positives as upstream's rows, in upstream's order.

        Returns ``(n, 11)`` float32 ``[b, a, gj, gi, tx, ty, tw, th, anchor_w,
        anchor_h, class]`` -- ``indices``, ``tbox``, ``anch`` and ``tcls`` of
        upstream ``build_targets`` for this level side by side.
        """
        f = self.flat()
        keep = np.asarray(f.mask)
        cols = [
            np.asarray(f.image)[:, None],
            np.asarray(f.anchor)[:, None],
            np.asarray(f.gj)[:, None],
            np.asarray(f.gi)[:, None],
            np.asarray(f.tbox),
            np.asarray(f.anchor_wh),
            np.asarray(f.classes)[:, None],
        ]
        return np.concatenate([c.astype(np.float32) for c in cols], axis=1)[keep]


def yolov5_anchors_and_strides(anchors, strides, num_levels: int | None = None):
    """Validate YOLOv5 anchors/strides (trace time) and return them in grid units.

    Args:
      anchors: ``(L, na, 2)`` anchor ``(w, h)`` in **pixels** (the model yaml's
        values), any array-like (may be traced).
      strides: ``L`` positive Python numbers (pixels per cell), e.g. ``(8, 16, 32)``.
      num_levels: if given, ``L`` must equal it.

    Returns:
      ``(anchors_grid (L, na, 2) float32 = anchors / stride, strides tuple of float)``
      -- the division is upstream ``Detect``'s ``anchors /= stride`` in float32.
    """
    try:
        strides = tuple(float(s) for s in np.asarray(strides, dtype=np.float64).reshape(-1))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise TypeError("strides must be concrete Python numbers (they are static), e.g. (8, 16, 32)") from None
    if any(not np.isfinite(s) or s <= 0 for s in strides):
        raise ValueError(f"strides must be positive, got {strides}")
    anchors = _checks.float_array(anchors, "anchors")
    if anchors.ndim != 3 or anchors.shape[-1] != 2 or anchors.shape[1] == 0:
        raise ValueError(f"anchors must have shape (L, na, 2) (pixel w, h per level and anchor), got {tuple(anchors.shape)}")
    if anchors.shape[0] != len(strides):
        raise ValueError(f"anchors has {anchors.shape[0]} levels but strides has {len(strides)}")
    if num_levels is not None and len(strides) != num_levels:
        raise ValueError(f"anchors/strides describe {len(strides)} levels but there are {num_levels} prediction levels")
    anchors = anchors.astype(jnp.float32)
    # a true division (see build_targets_stacked: XLA would multiply by 1 / stride, inexact unless a power of 2)
    stride = jnp.broadcast_to(jnp.asarray(strides, jnp.float32)[:, None, None], anchors.shape)
    grid = anchors / jax.lax.optimization_barrier(stride)
    return grid, strides


def yolov5_build_targets(
    targets: Targets,
    *,
    anchors,
    strides: Sequence[float],
    feature_shapes: Sequence[tuple[int, int]],
    anchor_t: float = 4.0,
) -> list[Yolov5LevelTargets]:
    """YOLOv5 ``build_targets`` as masked candidate slots (see the module docstring).

    Args:
      targets: :class:`~jaxyolo.Targets` -- ``boxes (B, M, 4)`` normalised cxcywh,
        ``classes (B, M)``, ``mask (B, M)``.
      anchors: ``(L, na, 2)`` anchor sizes in pixels (yaml values).
      strides: ``L`` strides in pixels, e.g. ``(8, 16, 32)``.
      feature_shapes: ``L`` grid sizes ``(H, W)`` in cells.
      anchor_t: the ``anchor_t`` hyperparameter (strict ``<``).

    Returns:
      One :class:`Yolov5LevelTargets` per level, each with leading shape
      ``(5, na, B, M)`` -- shapes depend only on ``(B, M, na, L)``.
    """
    targets = Targets.checked(targets, name="targets")
    anchors_grid, strides = yolov5_anchors_and_strides(anchors, strides)
    stacked = build_targets_stacked(targets, anchors_grid, feature_shapes, anchor_t=anchor_t)
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(len(strides))]


def build_targets_stacked(targets: Targets, anchors_grid, feature_shapes, *, anchor_t=4.0) -> Yolov5LevelTargets:
    """All levels at once: every field gets a leading level axis, ``(L, 5, na, B, M, ...)``.

    ``anchors_grid``: ``(L, na, 2)`` anchors in grid units; ``feature_shapes``:
    ``L`` static ``(H, W)``.  Computing the levels as one batch keeps the
    compiled program (and its compile time) small; the arithmetic per element is
    the same as upstream's per-level loop.
    """
    shapes = [tuple(int(v) for v in s) for s in feature_shapes]
    if len(shapes) != anchors_grid.shape[0]:
        raise ValueError(f"feature_shapes has {len(shapes)} levels but anchors have {anchors_grid.shape[0]}")
    if any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise ValueError(f"feature_shapes must be positive (H, W) pairs, got {shapes}")
    nl, na = anchors_grid.shape[:2]
    bsz, m = targets.mask.shape
    gain = jnp.asarray([[w, h] for h, w in shapes], jnp.float32)[:, None, None, :]  # (L, 1, 1, 2)
    gxy = targets.boxes[None, ..., :2] * gain  # (L, B, M, 2) grid units
    gwh = targets.boxes[None, ..., 2:] * gain

    # Anchor match: (L, na, B, M).  XLA rewrites ``x / broadcast(a)`` as ``x * broadcast(1 / a)``,
    # which is not IEEE division and moves ratios that are exactly ``anchor_t`` upstream (e.g.
    # 1.5 / 3.75 -> 1 / r = 2.5) below it; the barrier keeps the true division torch does.
    den = jax.lax.optimization_barrier(jnp.broadcast_to(anchors_grid[:, :, None, None, :], (nl, na, bsz, m, 2)))
    r = gwh[:, None] / den
    worst = jnp.max(jnp.maximum(r, 1.0 / r), axis=-1)
    matched = (worst < anchor_t) & targets.mask[None, None]

    # Neighbour rules: (L, 5, B, M) -- own, left, up, right, down.
    gxi = gain - gxy
    near = (jnp.remainder(gxy, 1.0) < 0.5) & (gxy > 1.0)
    far = (jnp.remainder(gxi, 1.0) < 0.5) & (gxi > 1.0)
    use = jnp.stack([jnp.ones_like(near[..., 0]), near[..., 0], near[..., 1], far[..., 0], far[..., 1]], axis=1)
    mask = use[:, :, None] & matched[:, None]  # (L, 5, na, B, M)

    off = jnp.asarray(YOLOV5_OFFSETS, jnp.float32)[None, :, None, None, :]  # (1, 5, 1, 1, 2)
    gij = jnp.trunc(gxy[:, None] - off).astype(jnp.int32)  # (L, 5, B, M, 2); .long() truncates
    hi = jnp.asarray([[w - 1, h - 1] for h, w in shapes], jnp.int32)[:, None, None, None, :]
    gij = jnp.clip(gij, 0, hi)
    # Upstream's in-place clamp_ also changes gij, hence tbox uses the clamped cell.
    txy = gxy[:, None] - gij.astype(jnp.float32)  # (L, 5, B, M, 2)
    tbox = jnp.concatenate([txy, jnp.broadcast_to(gwh[:, None], txy.shape)], axis=-1)

    full = (nl, 5, na, bsz, m)
    image = jnp.broadcast_to(jnp.arange(bsz, dtype=jnp.int32)[:, None], full)
    anchor = jnp.broadcast_to(jnp.arange(na, dtype=jnp.int32)[:, None, None], full)
    return Yolov5LevelTargets(
        mask=mask,
        image=image,
        anchor=anchor,
        gj=jnp.broadcast_to(gij[:, :, None, ..., 1], full),
        gi=jnp.broadcast_to(gij[:, :, None, ..., 0], full),
        tbox=jnp.broadcast_to(tbox[:, :, None], full + (4,)),
        anchor_wh=jnp.broadcast_to(anchors_grid[:, None, :, None, None, :], full + (2,)),
        classes=jnp.broadcast_to(targets.classes[None, None, None], full),
    )
