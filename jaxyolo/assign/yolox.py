"""YOLOX's SimOTA label assignment at static shapes (one image; vmap over B).

Upstream (``yolox==0.3.0``, ``YOLOXHead.get_assignments``) works on a
compacted list of candidate anchors, loops over the ground truths in Python
and calls ``.item()``; here every step is a dense ``(M, A)`` computation on the
padded targets, so the function is jittable and vmappable:

1. **Candidates** (``get_in_boxes_info``).  Anchor ``a`` (cell centre
   ``(x + 0.5) s, (y + 0.5) s`` in pixels) is *in box* ``m`` when it lies
   strictly inside the GT box and *in centre* ``m`` when it lies strictly
   within ``center_radius * s`` of the GT centre on both axes.  The candidate
   set is the union over all GTs of ``in_box | in_centre``; the *geometry*
   term of GT ``m`` is ``in_box[m] & in_centre[m]``.  With
   ``variant="main"`` (YOLOX after 0.3.0, ``get_geometry_constraint``) the
   box test is dropped: candidates and geometry are the centre test alone
   (radius 1.5 by default) and the penalty is ``1e6``.
2. **Cost** over candidates, in float32:
   ``sum_c BCE(sqrt(sigmoid(cls) * sigmoid(obj)), onehot) + 3 * -log(IoU + 1e-8)
   + penalty * ~geometry``, with ``F.binary_cross_entropy``'s ``log`` clamp
   at ``-100`` and YOLOX's own eps-free IoU (``bboxes_iou(..., xyxy=False)``).
   The class term is computed as "all classes negative" plus a correction
   at the GT's class, so no ``(M, A, nc)`` tensor exists.
3. **Dynamic k** (``dynamic_k_matching``): ``k_m = max(1, trunc(sum of the
   top-min(10, #candidates) candidate IoUs))``.  Non-candidates enter the top
   10 as IoU 0, which adds exactly nothing to the sum.
4. **Selection**: ``top_k(-cost, 10)`` per GT (non-candidates at ``+inf``),
   keeping ranks ``< k_m``; ``k_m <= 10`` always, since every IoU is ``<= 1``.
5. **Conflicts**: an anchor selected by several GTs goes to the GT of least
   cost.  *Upstream quirk*: the argmin runs over **all** GTs of the image, so
   the anchor can go to a GT whose top-k never contained it (it is real in
   YOLOX 0.1.0, 0.3.0 and main).  ``strict_conflicts=True`` restricts the
   argmin to the GTs that selected the anchor.

Near-ties: the output is a discrete function of float32 sums, so when two
costs are equal to within float32 rounding (or a dynamic-k IoU sum is within
a few ulp of an integer) the summation order decides, and XLA's order is not
torch's.  Parity is exact away from such ties; at a tie both answers are
legitimate.  The ``1e5`` (``1e6``) penalty quantises penalised costs to
``2**-7`` (``2**-4``) in float32, which is upstream's behaviour too.

Gradients: the assignment is under ``stop_gradient`` (upstream runs it under
``torch.no_grad``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxyolo import _checks
from jaxyolo._math import safe_div

__all__ = ["SimOTAAssignment", "simota", "SIMOTA_VARIANTS"]

SIMOTA_VARIANTS = ("0.3.0", "main")
#: Variant defaults: (center_radius, geometry_penalty).
VARIANT_DEFAULTS = {"0.3.0": (2.5, 1e5), "main": (1.5, 1e6)}


class SimOTAAssignment(NamedTuple):
    """SimOTA output for one image (add a leading ``B`` axis under ``vmap``).

    Attributes:
      fg_mask: ``(A,)`` bool, anchor is a positive.
      matched_gt: ``(A,)`` int32 index into the ``M`` GT slots of the matched
        GT; ``-1`` for background anchors.
      matched_iou: ``(A,)`` float32 IoU between the anchor's decoded box and
        its matched GT (upstream ``pred_ious_this_matching``); 0 for background.
      num_fg: ``()`` int32 number of positives.
      num_conflicts: ``()`` int32 number of anchors selected by more than one
        GT (resolved by the argmin rule); diagnostic only.
    """

    fg_mask: jax.Array
    matched_gt: jax.Array
    matched_iou: jax.Array
    num_fg: jax.Array
    num_conflicts: jax.Array


def _first_argmin(x, axis):
    """``argmin`` (first index among equal minima) as two plain reductions;
    XLA:CPU's variadic-reduce argmin over a non-minor axis is several times slower."""
    lowest = jnp.min(x, axis=axis, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return jnp.min(jnp.where(x == lowest, iota, x.shape[axis]), axis=axis)


def _pairwise_iou(gt_boxes, pred_boxes):
    """``(M, A)`` YOLOX ``bboxes_iou(gt, pred, xyxy=False)``, axis by axis.

    The same float32 operations as :func:`jaxyolo.boxes.yolox_bboxes_iou`
    (hence identical values), without the size-2 minor axis that XLA:CPU
    reduces slowly.  Padded all-zero GT rows give 0 (not 0/0).
    """
    g, q = gt_boxes[:, None, :], pred_boxes[None, :, :]
    tl_x = jnp.maximum(g[..., 0] - g[..., 2] / 2, q[..., 0] - q[..., 2] / 2)
    tl_y = jnp.maximum(g[..., 1] - g[..., 3] / 2, q[..., 1] - q[..., 3] / 2)
    br_x = jnp.minimum(g[..., 0] + g[..., 2] / 2, q[..., 0] + q[..., 2] / 2)
    br_y = jnp.minimum(g[..., 1] + g[..., 3] / 2, q[..., 1] + q[..., 3] / 2)
    en = ((tl_x < br_x) & (tl_y < br_y)).astype(jnp.float32)
    inter = (br_x - tl_x) * (br_y - tl_y) * en
    union = g[..., 2] * g[..., 3] + q[..., 2] * q[..., 3] - inter
    return safe_div(inter, union)


def _bce_log(x):
    """``max(log(x), -100)``: the clamp inside ``F.binary_cross_entropy``."""
    return jnp.maximum(jnp.log(x), -100.0)


def simota(
    pred_boxes,
    obj_logits,
    cls_logits,
    anchor_points,
    anchor_strides,
    gt_boxes,
    gt_classes,
    gt_mask,
    *,
    center_radius: float | None = None,
    candidate_topk: int = 10,
    cost_iou_weight: float = 3.0,
    geometry_penalty: float | None = None,
    variant: str = "0.3.0",
    strict_conflicts: bool = False,
) -> SimOTAAssignment:
    """SimOTA dynamic-k assignment of one image, at static shapes.

    Args:
      pred_boxes: ``(A, 4)`` decoded predicted boxes, cxcywh **pixels**.
      obj_logits: ``(A,)`` objectness logits.
      cls_logits: ``(A, nc)`` class logits, or a list of ``(A_l, nc)`` pieces
        that concatenate (along ``A``) to it, e.g. one per level: the class
        cost is computed piece by piece, so the caller need not build the
        concatenated ``(A, nc)`` array (a pure memory cost on CPU).
      anchor_points: ``(A, 2)`` ``(x, y)`` cell indices in **grid units** of each
        anchor's level (top-left, i.e. ``make_anchor_points(..., offset=0)``).
      anchor_strides: ``(A,)`` or ``(A, 1)`` pixels per cell of each anchor.
      gt_boxes: ``(M, 4)`` GT boxes, cxcywh **pixels**; padded rows anything.
      gt_classes: ``(M,)`` int class ids in ``[0, nc)`` (padded rows ignored).
      gt_mask: ``(M,)`` bool, True for real GTs.
      center_radius: centre-prior radius in strides; ``None`` = the variant's
        (2.5 for ``"0.3.0"``, 1.5 for ``"main"``).
      candidate_topk: the ``10`` of upstream's ``min(10, #candidates)``; also
        bounds k.
      cost_iou_weight: weight of ``-log(IoU + 1e-8)`` in the cost (3.0).
      geometry_penalty: cost added outside the geometry prior; ``None`` = the
        variant's (``1e5`` / ``1e6``).
      variant: ``"0.3.0"`` (box-or-centre candidates, box-and-centre geometry)
        or ``"main"`` (centre-only, YOLOX after 0.3.0).
      strict_conflicts: resolve a multiply-selected anchor among the GTs that
        selected it only (upstream: among all GTs).

    Returns:
      :class:`SimOTAAssignment`.  Inputs are taken under ``stop_gradient``.
    """
    _checks.choice(variant, SIMOTA_VARIANTS, "variant")
    candidate_topk = _checks.positive_int(candidate_topk, "candidate_topk")
    radius_default, penalty_default = VARIANT_DEFAULTS[variant]
    center_radius = radius_default if center_radius is None else float(center_radius)
    geometry_penalty = penalty_default if geometry_penalty is None else float(geometry_penalty)

    pred_boxes = _checks.float_array(pred_boxes, "pred_boxes").astype(jnp.float32)
    obj_logits = _checks.float_array(obj_logits, "obj_logits").astype(jnp.float32)
    if isinstance(cls_logits, (list, tuple)):
        if len(cls_logits) == 0:
            raise ValueError("cls_logits must hold at least one (A_l, nc) piece")
        cls_parts = [_checks.float_array(c, f"cls_logits[{i}]").astype(jnp.float32) for i, c in enumerate(cls_logits)]
        for i, c in enumerate(cls_parts):
            _checks.ndim(c, 2, f"cls_logits[{i}]", "(A_l, nc)")
            if c.shape[-1] != cls_parts[0].shape[-1]:
                raise ValueError(f"cls_logits pieces must share nc: {cls_parts[0].shape} vs {c.shape}")
        cls_shape = (sum(c.shape[0] for c in cls_parts), cls_parts[0].shape[-1])
    else:
        cls_parts = [_checks.float_array(cls_logits, "cls_logits").astype(jnp.float32)]
        _checks.ndim(cls_parts[0], 2, "cls_logits", "(A, nc)")
        cls_shape = cls_parts[0].shape
    anchor_points = _checks.float_array(anchor_points, "anchor_points").astype(jnp.float32)
    anchor_strides = _checks.float_array(anchor_strides, "anchor_strides").astype(jnp.float32)
    gt_boxes = _checks.float_array(gt_boxes, "gt_boxes").astype(jnp.float32)
    gt_classes = _checks.int_array(gt_classes, "gt_classes").astype(jnp.int32)
    gt_mask = _checks.bool_array(gt_mask, "gt_mask")
    _checks.ndim(pred_boxes, 2, "pred_boxes", "(A, 4)")
    _checks.last_dim(pred_boxes, 4, "pred_boxes", "cx, cy, w, h in pixels")
    _checks.ndim(anchor_points, 2, "anchor_points", "(A, 2)")
    _checks.last_dim(anchor_points, 2, "anchor_points", "x, y in grid units")
    if anchor_strides.ndim == 2 and anchor_strides.shape[-1] == 1:
        anchor_strides = anchor_strides[:, 0]
    _checks.ndim(anchor_strides, 1, "anchor_strides", "(A,) or (A, 1)")
    _checks.ndim(gt_boxes, 2, "gt_boxes", "(M, 4)")
    _checks.last_dim(gt_boxes, 4, "gt_boxes", "cx, cy, w, h in pixels")
    num_anchors, num_gt_slots = pred_boxes.shape[0], gt_boxes.shape[0]
    for name, arr, shape in (
        ("obj_logits", obj_logits, (num_anchors,)),
        ("cls_logits", jax.ShapeDtypeStruct(cls_shape, jnp.float32), (num_anchors, cls_shape[-1])),
        ("anchor_points", anchor_points, (num_anchors, 2)),
        ("anchor_strides", anchor_strides, (num_anchors,)),
        ("gt_classes", gt_classes, (num_gt_slots,)),
        ("gt_mask", gt_mask, (num_gt_slots,)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (A={num_anchors}, M={num_gt_slots}), got {arr.shape}")
    nc = cls_shape[-1]
    if nc == 0:
        raise ValueError("cls_logits must have at least one class, got shape (A, 0)")

    if num_gt_slots == 0 or num_anchors == 0:  # static: nothing to assign
        return SimOTAAssignment(
            jnp.zeros((num_anchors,), bool),
            jnp.full((num_anchors,), -1, jnp.int32),
            jnp.zeros((num_anchors,), jnp.float32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    sg = jax.lax.stop_gradient
    pred_boxes, obj_logits, gt_boxes = sg(pred_boxes), sg(obj_logits), sg(gt_boxes)
    cls_parts = [sg(c) for c in cls_parts]

    # 1. geometry (M, A); float32 operation order follows upstream.
    s = anchor_strides[None, :]
    if variant == "0.3.0":
        xc = anchor_points[None, :, 0] * s + 0.5 * s
        yc = anchor_points[None, :, 1] * s + 0.5 * s
    else:
        xc = (anchor_points[None, :, 0] + 0.5) * s
        yc = (anchor_points[None, :, 1] + 0.5) * s
    gx, gy = gt_boxes[:, 0:1], gt_boxes[:, 1:2]
    gw, gh = gt_boxes[:, 2:3], gt_boxes[:, 3:4]
    dist = center_radius * s if variant == "0.3.0" else s * center_radius
    in_centre = ((xc - (gx - dist)) > 0) & (((gx + dist) - xc) > 0) & ((yc - (gy - dist)) > 0) & (((gy + dist) - yc) > 0)
    in_centre = in_centre & gt_mask[:, None]
    if variant == "0.3.0":
        in_box = (
            ((xc - (gx - 0.5 * gw)) > 0)
            & (((gx + 0.5 * gw) - xc) > 0)
            & ((yc - (gy - 0.5 * gh)) > 0)
            & (((gy + 0.5 * gh) - yc) > 0)
        )
        in_box = in_box & gt_mask[:, None]
        candidate = jnp.any(in_box, axis=0) | jnp.any(in_centre, axis=0)  # (A,)
        geometry = in_box & in_centre
    else:
        candidate = jnp.any(in_centre, axis=0)
        geometry = in_centre

    # 2. cost (M, A)
    iou = _pairwise_iou(gt_boxes, pred_boxes)  # (M, A)
    iou_cost = -jnp.log(iou + 1e-8)
    # Per piece: the (A_l,) all-negative class cost and the (M, A_l) logits at
    # each GT's class.  p at the GT's class is recomputed from the gathered
    # *logits*: gathering p itself makes XLA materialise the whole (A, nc) p,
    # and the (A, nc) pass is memory-bound on CPU.
    obj_sig = jax.nn.sigmoid(obj_logits)
    gt_cls = jnp.clip(gt_classes, 0, nc - 1)
    all_neg, logit_gt, start = [], [], 0
    for c in cls_parts:
        p = jnp.sqrt(jax.nn.sigmoid(c) * obj_sig[start : start + c.shape[0], None])  # (A_l, nc)
        all_neg.append(jnp.sum(-_bce_log(1.0 - p), axis=-1))  # BCE against all-zero targets
        logit_gt.append(jnp.take(c, gt_cls, axis=1).T)
        start += c.shape[0]
    cls_cost_all_neg = jnp.concatenate(all_neg)  # (A,)
    logit_gt = jnp.concatenate(logit_gt, axis=1)  # (M, A)
    p_gt = jnp.sqrt(jax.nn.sigmoid(logit_gt) * obj_sig[None, :])
    correction = -_bce_log(p_gt) - -_bce_log(1.0 - p_gt)  # swap that class's term to target 1
    cls_cost = cls_cost_all_neg[None, :] + correction
    cost = (cls_cost + cost_iou_weight * iou_cost) + geometry_penalty * (~geometry).astype(jnp.float32)
    valid = gt_mask[:, None] & candidate[None, :]
    cost_c = jnp.where(valid, cost, jnp.inf)

    # 3. dynamic k
    k_top = min(candidate_topk, num_anchors)
    top_ious, _ = jax.lax.top_k(jnp.where(valid, iou, 0.0), k_top)
    dynamic_k = jnp.maximum(jnp.sum(top_ious, axis=-1).astype(jnp.int32), 1)  # trunc, as .int()

    # 4. each GT takes its k lowest-cost candidates
    neg_top_cost, top_idx = jax.lax.top_k(-cost_c, k_top)  # ascending cost
    keep = (jnp.arange(k_top)[None, :] < dynamic_k[:, None]) & jnp.isfinite(neg_top_cost) & gt_mask[:, None]
    rows = jnp.broadcast_to(jnp.arange(num_gt_slots)[:, None], top_idx.shape)
    matching = jnp.zeros((num_gt_slots, num_anchors), bool).at[rows, top_idx].set(keep)

    # 5. conflicts
    count = jnp.sum(matching, axis=0)  # (A,)
    fg_mask = count > 0
    if strict_conflicts:
        conflict_cost = jnp.where(matching, cost_c, jnp.inf)
    else:
        conflict_cost = jnp.where(gt_mask[:, None], cost, jnp.inf)
    argmin_gt = _first_argmin(conflict_cost, axis=0)
    only_gt = _first_argmin(~matching, axis=0)  # the selecting GT where count == 1
    matched_gt = jnp.where(count > 1, argmin_gt, only_gt)
    matched_iou = jnp.take_along_axis(iou, matched_gt[None, :], axis=0)[0]
    return SimOTAAssignment(
        fg_mask,
        jnp.where(fg_mask, matched_gt, -1),
        jnp.where(fg_mask, matched_iou, 0.0),
        jnp.sum(fg_mask).astype(jnp.int32),
        jnp.sum(count > 1).astype(jnp.int32),
    )
