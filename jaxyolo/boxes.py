"""Box geometry: format conversions, IoU family, anchor points, ltrb distances.

Conventions
-----------
* ``xyxy``: ``(x1, y1, x2, y2)`` corners; ``xywh``/``cxcywh``: centre and size.
* ``ltrb``: distances from an anchor point to the left, top, right and bottom
  sides of a box (the v8 / YOLOv9 regression target).
* Units are whatever the caller uses (pixels, grid cells, normalised); every
  function here is unit-agnostic unless its docstring says otherwise.
* IoU-family functions broadcast ``box1`` against ``box2`` over all leading
  dimensions like the upstream ``bbox_iou``, but return shape ``(...)`` instead
  of upstream's trailing ``(..., 1)``.
* Inputs in bf16/fp16 are computed in float32.

Upstream differences kept behind ``convention=``:

=============  ==========================  ==============================
convention     height in xyxy mode         CIoU alpha (under stop_gradient)
=============  ==========================  ==============================
"ultralytics"  ``h = y2 - y1 + eps``       ``v / (1 - iou + v + eps)``
"yolov5"       ``h = clamp(y2 - y1, eps)`` ``v / (v - iou + (1 + eps))``
"yolov9"       ``h = y2 - y1 + eps``       ``v / (v - iou + (1 + eps))``
=============  ==========================  ==============================

``"yolov9"`` is YOLOv9's ``utils/metrics.py`` (WongKinYiu/yolov9 @5b1ea9a):
ultralytics' height with yolov5's (algebraically equal) alpha, so it agrees
with ``"ultralytics"`` to rounding and differs from ``"yolov5"`` where a side
is shorter than eps (degenerate and near-zero-size boxes).  In xywh mode no
upstream adds eps to the height.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo import _checks
from jaxyolo._math import atan_ratio, clamp, safe_div

IOU_KINDS = ("iou", "giou", "diou", "ciou")
CONVENTIONS = ("ultralytics", "yolov5", "yolov9")

__all__ = [
    "IOU_KINDS",
    "CONVENTIONS",
    "xywh2xyxy",
    "xyxy2xywh",
    "bbox_iou",
    "box_iou_matrix",
    "yolox_bboxes_iou",
    "make_anchor_points",
    "dist2bbox",
    "bbox2dist",
]


def xywh2xyxy(boxes):
    """``(..., 4)`` centre-size boxes to ``(..., 4)`` corner boxes (same units)."""
    boxes = _checks.float_array(boxes, "boxes")
    _checks.last_dim(boxes, 4, "boxes", "cx, cy, w, h")
    xy, wh = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)


def xyxy2xywh(boxes):
    """``(..., 4)`` corner boxes to ``(..., 4)`` centre-size boxes (same units)."""
    boxes = _checks.float_array(boxes, "boxes")
    _checks.last_dim(boxes, 4, "boxes", "x1, y1, x2, y2")
    x1y1, x2y2 = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], axis=-1)


def _split(boxes):
    return tuple(boxes[..., i] for i in range(4))


def xyxy_height(y1, y2, *, eps, convention):
    """Box height as ``convention``'s ``bbox_iou`` computes it in xyxy mode (see the table above)."""
    return clamp(y2 - y1, eps) if convention == "yolov5" else y2 - y1 + eps


def ciou_alpha_denominator(v, iou, *, eps, convention):
    """The denominator of CIoU's ``alpha = v / den`` in ``convention`` (see the table above)."""
    return 1 - iou + v + eps if convention == "ultralytics" else v - iou + (1 + eps)


def bbox_iou(box1, box2, *, xywh=True, kind="iou", eps=1e-7, convention="ultralytics"):
    """IoU, GIoU, DIoU or CIoU of broadcast box pairs, as upstream ``bbox_iou``.

    Args:
      box1: ``(..., 4)`` boxes, cxcywh (or xyxy with ``xywh=False``), any units.
      box2: ``(..., 4)`` boxes in the same format and units; broadcasts with
        ``box1`` over the leading dimensions.
      xywh: inputs are centre-size; ``False`` for corners.  Defaults to
        ``True`` like upstream yolov5, ultralytics and YOLOv9, so code ported
        from them gets the same numbers.
      kind: ``"iou" | "giou" | "diou" | "ciou"``.
      eps: the upstream stabiliser (added to union, enclosing area/diagonal).
      convention: ``"ultralytics"``, ``"yolov5"`` or ``"yolov9"``; see the
        module docstring for the two places they differ.

    Returns:
      ``(...)`` float32 (or wider) overlap.  For ``"ciou"`` the aspect-ratio
      weight ``alpha`` is under ``stop_gradient`` as upstream.  Degenerate
      boxes (zero or negative size, padded rows of zeros) give finite values
      and gradients; where upstream itself is finite the value is upstream's.
    """
    box1 = _checks.float_array(box1, "box1")
    box2 = _checks.float_array(box2, "box2")
    _checks.last_dim(box1, 4, "box1")
    _checks.last_dim(box2, 4, "box2")
    _checks.broadcast_batch(box1, box2, "box1", "box2")
    _checks.choice(kind, IOU_KINDS, "kind")
    _checks.choice(convention, CONVENTIONS, "convention")
    dtype = jnp.promote_types(box1.dtype, box2.dtype)
    box1, box2 = box1.astype(dtype), box2.astype(dtype)

    if xywh:
        x1, y1, w1, h1 = _split(box1)
        x2, y2, w2, h2 = _split(box2)
        b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        b1_x1, b1_y1, b1_x2, b1_y2 = _split(box1)
        b2_x1, b2_y1, b2_x2, b2_y2 = _split(box2)
        w1, w2 = b1_x2 - b1_x1, b2_x2 - b2_x1
        h1 = xyxy_height(b1_y1, b1_y2, eps=eps, convention=convention)
        h2 = xyxy_height(b2_y1, b2_y2, eps=eps, convention=convention)

    inter = clamp(jnp.minimum(b1_x2, b2_x2) - jnp.maximum(b1_x1, b2_x1), 0.0) * clamp(
        jnp.minimum(b1_y2, b2_y2) - jnp.maximum(b1_y1, b2_y1), 0.0
    )
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = safe_div(inter, union)
    if kind == "iou":
        return iou

    cw = jnp.maximum(b1_x2, b2_x2) - jnp.minimum(b1_x1, b2_x1)  # enclosing box width
    ch = jnp.maximum(b1_y2, b2_y2) - jnp.minimum(b1_y1, b2_y1)  # enclosing box height
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - safe_div(c_area - union, c_area)

    c2 = cw**2 + ch**2 + eps  # enclosing diagonal squared
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    if kind == "diou":
        return iou - safe_div(rho2, c2)

    v = (4 / math.pi**2) * (atan_ratio(w2, h2) - atan_ratio(w1, h1)) ** 2
    alpha_den = ciou_alpha_denominator(v, iou, eps=eps, convention=convention)
    alpha = jax.lax.stop_gradient(safe_div(v, alpha_den))
    return iou - (safe_div(rho2, c2) + v * alpha)


def box_iou_matrix(boxes1, boxes2, *, eps=1e-7):
    """Pairwise IoU of two sets of xyxy boxes (torchvision/upstream ``box_iou``).

    Args:
      boxes1: ``(N, 4)`` xyxy boxes.
      boxes2: ``(K, 4)`` xyxy boxes in the same units.
      eps: added to the union, as yolov5/ultralytics ``box_iou``.

    Returns:
      ``(N, K)`` IoU.
    """
    boxes1 = _checks.float_array(boxes1, "boxes1")
    boxes2 = _checks.float_array(boxes2, "boxes2")
    _checks.ndim(boxes1, 2, "boxes1", "(N, 4)")
    _checks.ndim(boxes2, 2, "boxes2", "(K, 4)")
    _checks.last_dim(boxes1, 4, "boxes1")
    _checks.last_dim(boxes2, 4, "boxes2")
    a1, a2 = boxes1[:, None, :2], boxes1[:, None, 2:]
    b1, b2 = boxes2[None, :, :2], boxes2[None, :, 2:]
    inter = jnp.prod(clamp(jnp.minimum(a2, b2) - jnp.maximum(a1, b1), 0.0), axis=-1)
    area1 = jnp.prod(a2 - a1, axis=-1)
    area2 = jnp.prod(b2 - b1, axis=-1)
    return safe_div(inter, area1 + area2 - inter + eps)


def yolox_bboxes_iou(boxes1, boxes2, *, xyxy=True):
    """Pairwise IoU exactly as YOLOX's ``bboxes_iou`` (no eps).

    Args:
      boxes1: ``(N, 4)`` boxes, xyxy or cxcywh (``xyxy=False``).
      boxes2: ``(K, 4)`` boxes in the same format and units.

    Returns:
      ``(N, K)`` IoU.  The intersection is zeroed unless ``tl < br`` on both
      axes (YOLOX's ``en`` mask).  Where upstream divides 0 by 0 (two zero-area
      boxes) this returns 0 instead of NaN.
    """
    boxes1 = _checks.float_array(boxes1, "boxes1")
    boxes2 = _checks.float_array(boxes2, "boxes2")
    _checks.ndim(boxes1, 2, "boxes1", "(N, 4)")
    _checks.ndim(boxes2, 2, "boxes2", "(K, 4)")
    _checks.last_dim(boxes1, 4, "boxes1")
    _checks.last_dim(boxes2, 4, "boxes2")
    if xyxy:
        tl = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
        br = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
        area1 = jnp.prod(boxes1[:, 2:] - boxes1[:, :2], axis=1)
        area2 = jnp.prod(boxes2[:, 2:] - boxes2[:, :2], axis=1)
    else:
        tl = jnp.maximum(
            boxes1[:, None, :2] - boxes1[:, None, 2:] / 2, boxes2[None, :, :2] - boxes2[None, :, 2:] / 2
        )
        br = jnp.minimum(
            boxes1[:, None, :2] + boxes1[:, None, 2:] / 2, boxes2[None, :, :2] + boxes2[None, :, 2:] / 2
        )
        area1 = jnp.prod(boxes1[:, 2:], axis=1)
        area2 = jnp.prod(boxes2[:, 2:], axis=1)
    en = jnp.all(tl < br, axis=-1).astype(tl.dtype)
    inter = jnp.prod(br - tl, axis=-1) * en
    return safe_div(inter, area1[:, None] + area2[None, :] - inter)


def make_anchor_points(feature_shapes: Sequence[tuple[int, int]], strides: Sequence[float], *, offset=0.5):
    """Anchor points of every level, concatenated level by level (row-major).

    Args:
      feature_shapes: ``[(H, W), ...]`` per level (static Python ints).
      strides: pixels per grid cell of each level.
      offset: grid-cell offset; 0.5 gives cell centres (upstream ``make_anchors``).

    Returns:
      ``points``: ``(A, 2)`` float32 ``(x, y)`` in **grid units** of each
      point's own level; ``stride``: ``(A, 1)`` float32 pixels per cell.
      Multiply the two for pixel coordinates.
    """
    if len(feature_shapes) != len(strides):
        raise ValueError(
            f"feature_shapes and strides must have one entry per level, got {len(feature_shapes)} and {len(strides)}"
        )
    points, stride_col = [], []
    for (h, w), s in zip(feature_shapes, strides):
        h, w = _checks.positive_int(h, "feature_shapes H"), _checks.positive_int(w, "feature_shapes W")
        sy, sx = np.meshgrid(np.arange(h, dtype=np.float32) + offset, np.arange(w, dtype=np.float32) + offset, indexing="ij")
        points.append(np.stack([sx, sy], axis=-1).reshape(-1, 2))
        stride_col.append(np.full((h * w, 1), s, dtype=np.float32))
    return jnp.asarray(np.concatenate(points)), jnp.asarray(np.concatenate(stride_col))


def dist2bbox(distance, anchor_points, *, xywh=True):
    """ltrb distances to boxes, as upstream ``dist2bbox`` (``dim=-1``).

    Args:
      distance: ``(..., 4)`` left, top, right, bottom distances.
      anchor_points: ``(..., 2)`` points in the same units, broadcasting with
        ``distance``'s leading dimensions.
      xywh: return cxcywh (upstream default) instead of xyxy.

    Returns:
      ``(..., 4)`` boxes in the units of the inputs.
    """
    distance = _checks.float_array(distance, "distance")
    anchor_points = _checks.float_array(anchor_points, "anchor_points")
    _checks.last_dim(distance, 4, "distance", "l, t, r, b")
    _checks.last_dim(anchor_points, 2, "anchor_points", "x, y")
    x1y1 = anchor_points - distance[..., :2]
    x2y2 = anchor_points + distance[..., 2:]
    if xywh:
        return jnp.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], axis=-1)
    return jnp.concatenate([x1y1, x2y2], axis=-1)


def bbox2dist(anchor_points, boxes, reg_max=None):
    """xyxy boxes to ltrb distances, as upstream ``bbox2dist``.

    Args:
      anchor_points: ``(..., 2)`` points.
      boxes: ``(..., 4)`` xyxy boxes in the same units (grid units for DFL).
      reg_max: if given, distances are clamped to ``[0, reg_max - 0.01]`` as
        ultralytics 8.4 does (v8's loss passes ``reg_max - 1`` here).

    Returns:
      ``(..., 4)`` ltrb distances.
    """
    anchor_points = _checks.float_array(anchor_points, "anchor_points")
    boxes = _checks.float_array(boxes, "boxes")
    _checks.last_dim(anchor_points, 2, "anchor_points", "x, y")
    _checks.last_dim(boxes, 4, "boxes", "x1, y1, x2, y2")
    dist = jnp.concatenate([anchor_points - boxes[..., :2], boxes[..., 2:] - anchor_points], axis=-1)
    if reg_max is not None:
        dist = clamp(dist, 0.0, reg_max - 0.01)
    return dist
