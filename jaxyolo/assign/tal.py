"""The task-aligned assigner (TOOD / TAL) of YOLOv8 (ultralytics 8.4.190) and YOLOv9.

For every (image, GT, anchor) triple the assigner scores how well the anchor's
prediction already fits the GT::

    align = score[gt class] ** alpha * max(CIoU(gt, pred), 0) ** beta

keeps, per GT, the ``topk`` anchors of highest ``align`` among the anchors whose
centre lies inside the GT, resolves anchors claimed by several GTs in favour of
the GT of highest overlap, and returns soft class targets normalised per GT by
``max_pos(overlap) / (max_pos(align) + eps)``.

Everything is dense over ``(B, M, A)`` with static shapes: padded GTs are
masked out, there is no ``nonzero``, no boolean compaction and no
data-dependent branch (upstream's ``n_max_boxes == 0`` / ``fg_mask.max() > 1``
shortcuts are no-ops of the dense formulation).

Presets (``preset=``) differ exactly where the two upstreams differ:

``"ultralytics"`` (8.4.190 ``TaskAlignedAssigner``)
  * in-GT test: a valid GT side shorter than ``stride_val`` (``strides[1]``,
    or ``strides[0]`` for a single level) is enlarged to ``stride_val`` about
    the GT centre, for this test only (the GT box itself is unchanged).  The
    box goes through ``xyxy -> xywh -> xyxy`` like upstream, which can move a
    coordinate by one ulp; this is reproduced.
  * overlaps and align metric are computed only for in-GT ∧ valid pairs and
    are zero elsewhere, so an anchor claimed by several GTs can only be handed
    to a GT that contains it.
  * CIoU with ultralytics' convention (``h + eps``; ``alpha = v / (1 - iou + v
    + eps)``).
  * optional ``topk2``: after the multi-GT resolution, keep per GT only the
    ``topk2`` anchors of highest align (upstream ``topk2 != topk``).

``"yolov9"`` (WongKinYiu/yolov9 ``utils/tal/assigner.py``)
  * in-GT test on the raw GT box (no enlargement).
  * overlaps and align metric are dense over every (GT, anchor) pair, padded
    GTs included; the top-k runs on ``align * in_gt``.  The multi-GT argmax
    therefore runs over *all* GTs: an anchor claimed by two GTs may be handed
    to a third GT that does not even contain it (upstream quirk, kept).
  * CIoU with YOLOv9's ``utils/metrics.py`` convention (``h + eps`` like
    ultralytics; ``alpha = v / (v - iou + (1 + eps))``).

Tie-breaking: where several anchors share the k-th largest align value
(typically several zero-metric anchors when a GT holds fewer than ``topk``
positive candidates) ``jax.lax.top_k`` takes the lowest anchor index; torch's
order is unspecified.  Such picks carry zero alignment; parity tests compare
the foreground where ``align > 0``.

Memory: the assigner is dense over ``(B, M, A)``: XLA keeps about four
float32-sized ``(B, M, A)`` buffers alive (CIoU, align metric, masks), i.e.
~17 bytes per (image, GT slot, anchor), linear in each of B, M and A.  At
B=16, 640x640 (A=8400), XLA's temp allocation for the compiled assigner is
60 MB at M=32, 228 MB at M=100 and 457 MB at M=200 (one float32 ``(B, M, A)``
array is 53.8 MB at M=100); the public :func:`task_aligned` additionally
returns the ``(B, A, nc)`` one-hot scores (43 MB at nc=80), which the loss never
materialises.  Pad ``M`` to the real maximum number of GTs per image, not more.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxyolo import _checks
from jaxyolo._math import atan_ratio, clamp
from jaxyolo.boxes import ciou_alpha_denominator, xyxy_height

PRESETS = ("ultralytics", "yolov9")

__all__ = [
    "PRESETS",
    "TalAssignment",
    "assign_core",
    "class_scores_at_gts",
    "resolve_batched",
    "task_aligned",
    "task_aligned_details",
]


class TalAssignment(NamedTuple):
    """Everything :func:`task_aligned_details` computes.

    Attributes:
      target_labels: ``(B, A)`` int32 class of the assigned GT (of GT 0 where
        not foreground, as upstream).
      target_bboxes: ``(B, A, 4)`` assigned GT box, pixels xyxy (GT 0's box
        where not foreground).
      target_scores: ``(B, A, nc)`` float32 normalised soft one-hot targets
        (zero off the foreground).
      fg_mask: ``(B, A)`` bool foreground.
      target_gt_idx: ``(B, A)`` int32 index of the assigned GT (0 off the
        foreground).
      align_metric: ``(B, M, A)`` float32 alignment metric before the top-k
        (zero outside in-GT ∧ valid pairs for ``"ultralytics"``).
      overlaps: ``(B, M, A)`` float32 clamped CIoU (same masking).
      mask_pos: ``(B, M, A)`` bool final positive (GT, anchor) pairs.
    """

    target_labels: jax.Array
    target_bboxes: jax.Array
    target_scores: jax.Array
    fg_mask: jax.Array
    target_gt_idx: jax.Array
    align_metric: jax.Array
    overlaps: jax.Array
    mask_pos: jax.Array


def _pairwise_ciou(gt, pd, *, eps, convention):
    """Clamped CIoU of every GT against every prediction, ``(B, M, A)``.

    Same arithmetic as :func:`jaxyolo.boxes.bbox_iou` with ``box1 = gt``,
    ``box2 = pd`` (the upstream argument order), but the arctan of the aspect
    ratio is computed once per box, ``(B, M)`` and ``(B, A)``, instead of once
    per pair.  No gradient is needed (the assigner runs under no_grad).
    """
    g = [gt[..., i][:, :, None] for i in range(4)]  # (B, M, 1)
    p = [pd[..., i][:, None, :] for i in range(4)]  # (B, 1, A)
    gx1, gy1, gx2, gy2 = (gt[..., i] for i in range(4))
    px1, py1, px2, py2 = (pd[..., i] for i in range(4))
    gw, pw = gx2 - gx1, px2 - px1
    gh = xyxy_height(gy1, gy2, eps=eps, convention=convention)
    ph = xyxy_height(py1, py2, eps=eps, convention=convention)
    inter = clamp(jnp.minimum(g[2], p[2]) - jnp.maximum(g[0], p[0]), 0.0) * clamp(
        jnp.minimum(g[3], p[3]) - jnp.maximum(g[1], p[1]), 0.0
    )
    union = (gw * gh)[:, :, None] + (pw * ph)[:, None, :] - inter + eps
    iou = inter / union
    cw = jnp.maximum(g[2], p[2]) - jnp.minimum(g[0], p[0])
    ch = jnp.maximum(g[3], p[3]) - jnp.minimum(g[1], p[1])
    c2 = cw**2 + ch**2 + eps
    rho2 = ((p[0] + p[2] - g[0] - g[2]) ** 2 + (p[1] + p[3] - g[1] - g[3]) ** 2) / 4
    v = (4 / math.pi**2) * (atan_ratio(pw, ph)[:, None, :] - atan_ratio(gw, gh)[:, :, None]) ** 2
    alpha = v / ciou_alpha_denominator(v, iou, eps=eps, convention=convention)
    ciou = iou - (rho2 / c2 + v * alpha)
    return clamp(ciou, 0.0)


def _in_gt_mask(anchor_points, gt_bboxes, gt_mask, *, preset, stride_val, eps=1e-9):
    """``(B, M, A)`` bool: anchor centre strictly inside the (enlarged) GT."""
    if preset == "ultralytics":
        x1, y1, x2, y2 = (gt_bboxes[..., i] for i in range(4))
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        sv = jnp.asarray(stride_val, gt_bboxes.dtype)
        w = jnp.where((w < sv) & gt_mask, sv, w)
        h = jnp.where((h < sv) & gt_mask, sv, h)
        x1, x2 = cx - w / 2, cx + w / 2
        y1, y2 = cy - h / 2, cy + h / 2
    else:
        x1, y1, x2, y2 = (gt_bboxes[..., i] for i in range(4))
    ax, ay = anchor_points[:, 0], anchor_points[:, 1]
    return (
        (ax - x1[..., None] > eps)
        & (ay - y1[..., None] > eps)
        & (x2[..., None] - ax > eps)
        & (y2[..., None] - ay > eps)
    )


def _topk_mask(metric, k, *, batched=False):
    """``(B, M, A)`` bool membership of the ``k`` largest entries along A
    (equal values: the lower index first, as ``jax.lax.top_k``).

    ``batched=False``: ``jax.lax.top_k`` and a scatter of its indices (fast
    on CPU).  ``batched=True``: ``k`` rounds of "take the first maximum of
    what is not taken yet", two row reductions per round over the whole
    ``(B, M, A)`` block and no sort or scatter (XLA may lower a top-k over
    ``A`` to a sort of every row on accelerators).  The same set for any
    non-NaN ``metric``.
    """
    b, m, a = metric.shape
    k = min(k, a)
    if batched:
        iota = jnp.arange(a, dtype=jnp.int32)
        taken = jnp.zeros(metric.shape, bool)
        for _ in range(k):
            rest = jnp.where(taken, -jnp.inf, metric)
            top = jnp.max(rest, axis=-1, keepdims=True)
            first = jnp.min(jnp.where(rest == top, iota, a), axis=-1, keepdims=True)
            taken = taken | (iota == first)
        return taken
    _, idx = jax.lax.top_k(metric, k)  # (B, M, k)
    bi = jnp.arange(b)[:, None, None]
    mi = jnp.arange(m)[None, :, None]
    return jnp.zeros(metric.shape, bool).at[bi, mi, idx].set(True)


def resolve_batched(batched):
    """The ``batched`` option of the losses: ``None`` means "auto from the
    backend", i.e. ``jax.default_backend()`` at trace time: ``True`` (the
    accelerator path) on ``"gpu"``/``"tpu"``, ``False`` (the CPU path) on
    ``"cpu"``.  A bool is returned as given."""
    if batched is None:
        return jax.default_backend() != "cpu"
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True, False or None (auto from the backend), got {batched!r}")
    return batched


def _first_argmax(x, axis):
    """``argmax`` (first maximum, as torch's CPU kernels) via two plain reductions.

    XLA:CPU lowers ``jnp.argmax`` to a variadic reduce that is ~50x slower than
    ``max``/``min`` over a middle axis; this is bit-identical for finite ``x``.
    """
    n = x.shape[axis]
    mx = jnp.max(x, axis=axis, keepdims=True)
    shape = [1] * x.ndim
    shape[axis] = n
    iota = jnp.arange(n, dtype=jnp.int32).reshape(shape)
    return jnp.min(jnp.where(x == mx, iota, n), axis=axis)


def _pow(x, p):
    """``x ** p``; integral ``p`` uses repeated multiplication (XLA:CPU's generic
    ``pow`` is exp(log) per element and ~20x slower)."""
    if float(p).is_integer() and 0 <= p <= 16:
        return jax.lax.integer_pow(x, int(p))
    if p == 0.5:
        return jnp.sqrt(x)
    return x**p


def class_scores_at_gts(pred_scores, gt_labels):
    """``(B, M, A)`` score of each GT's class at every anchor.

    Args:
      pred_scores: ``(B, A, nc)`` scores (probabilities, or logits to apply
        the sigmoid afterwards on the smaller ``(B, M, A)`` result).
      gt_labels: ``(B, M)`` int class ids (clipped into ``[0, nc)``).
    """
    nc = pred_scores.shape[-1]
    labels = jnp.clip(gt_labels, 0, nc - 1)
    return jnp.take_along_axis(jnp.swapaxes(pred_scores, 1, 2), labels[:, :, None], axis=1)


def assign_core(
    bbox_scores,
    pred_bboxes,
    anchor_points,
    gt_labels,
    gt_bboxes,
    gt_mask,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    preset: str = "ultralytics",
    topk2: int | None = None,
    strides=(8, 16, 32),
    batched: bool = False,
):
    """The assigner on precomputed class scores, with compact outputs.

    Args:
      bbox_scores: ``(B, M, A)`` probability of GT ``m``'s class at anchor
        ``a`` (:func:`class_scores_at_gts`).  Other arguments as
        :func:`task_aligned` (already validated, float32, no gradient).
      batched: the top-k of the accelerator path (see :func:`_topk_mask`);
        identical results.

    Returns:
      dict: ``target_labels (B, A)``, ``target_bboxes (B, A, 4)``, ``norm
      (B, A)`` (the target score of the assigned class; 0 off the
      foreground), ``fg_mask``, ``target_gt_idx``, ``align_metric``,
      ``overlaps``, ``mask_pos`` (``(B, M, A)``).  The one-hot ``(B, A, nc)``
      target scores are ``one_hot(target_labels) * norm``.
    """
    m = gt_bboxes.shape[1]
    strides = tuple(strides)
    stride_val = strides[1] if len(strides) > 1 else strides[0]
    valid = gt_mask[..., None]  # (B, M, 1)

    mask_in = _in_gt_mask(anchor_points, gt_bboxes, gt_mask, preset=preset, stride_val=stride_val)
    overlaps = _pairwise_ciou(gt_bboxes, pred_bboxes, eps=1e-7, convention=preset)  # CIoU convention = preset name
    align = _pow(bbox_scores, alpha) * _pow(overlaps, beta)
    if preset == "ultralytics":
        pair_ok = mask_in & valid
        overlaps = jnp.where(pair_ok, overlaps, 0.0)
        align = jnp.where(pair_ok, align, 0.0)
        topk_metric = align
    else:
        topk_metric = jnp.where(mask_in, align, 0.0)

    mask_pos = _topk_mask(topk_metric, topk, batched=batched) & mask_in & valid

    # An anchor claimed by several GTs goes to the GT of highest overlap.
    multi = jnp.sum(mask_pos, axis=1, keepdims=True) > 1  # (B, 1, A)
    best = _first_argmax(overlaps, axis=1)  # (B, A), first max as torch
    is_best = jnp.arange(m)[None, :, None] == best[:, None, :]
    mask_pos = jnp.where(multi, is_best, mask_pos)
    if preset == "ultralytics" and topk2 is not None and topk2 != topk:
        mask_pos = mask_pos & _topk_mask(jnp.where(mask_pos, align, 0.0), topk2, batched=batched)

    fg_mask = jnp.any(mask_pos, axis=1)  # (B, A)
    target_gt_idx = _first_argmax(mask_pos.astype(jnp.int8), axis=1)  # 0 where not fg

    labels = jnp.maximum(gt_labels, 0)
    target_labels = jnp.take_along_axis(labels, target_gt_idx, axis=1)
    target_bboxes = jnp.take_along_axis(gt_bboxes, target_gt_idx[..., None], axis=1)

    # Normalise: per GT, scale align by max overlap / max align over its positives.
    align_pos = jnp.where(mask_pos, align, 0.0)
    pos_align = jnp.max(align_pos, axis=-1, keepdims=True)  # (B, M, 1)
    pos_overlaps = jnp.max(jnp.where(mask_pos, overlaps, 0.0), axis=-1, keepdims=True)
    norm = jnp.max(align_pos * pos_overlaps / (pos_align + eps), axis=1)  # (B, A)
    norm = jnp.where(fg_mask, norm, 0.0).astype(jnp.float32)
    return dict(
        target_labels=target_labels.astype(jnp.int32),
        target_bboxes=target_bboxes,
        norm=norm,
        fg_mask=fg_mask,
        target_gt_idx=target_gt_idx,
        align_metric=align.astype(jnp.float32),
        overlaps=overlaps.astype(jnp.float32),
        mask_pos=mask_pos,
    )


def _validate(pred_scores, pred_bboxes, anchor_points, gt_labels, gt_bboxes, gt_mask, *, preset, topk, topk2):
    _checks.choice(preset, PRESETS, "preset")
    _checks.positive_int(topk, "topk")
    if topk2 is not None:
        _checks.positive_int(topk2, "topk2")
    pred_scores = jax.lax.stop_gradient(_checks.float_array(pred_scores, "pred_scores"))
    pred_bboxes = jax.lax.stop_gradient(_checks.float_array(pred_bboxes, "pred_bboxes"))
    anchor_points = jax.lax.stop_gradient(_checks.float_array(anchor_points, "anchor_points"))
    gt_bboxes = jax.lax.stop_gradient(_checks.float_array(gt_bboxes, "gt_bboxes"))
    gt_labels = _checks.int_array(gt_labels, "gt_labels")
    gt_mask = _checks.bool_array(gt_mask, "gt_mask")
    _checks.ndim(pred_scores, 3, "pred_scores", "(B, A, nc)")
    _checks.ndim(pred_bboxes, 3, "pred_bboxes", "(B, A, 4)")
    _checks.last_dim(pred_bboxes, 4, "pred_bboxes", "pixels x1, y1, x2, y2")
    _checks.ndim(anchor_points, 2, "anchor_points", "(A, 2)")
    _checks.last_dim(anchor_points, 2, "anchor_points", "pixels x, y")
    _checks.ndim(gt_bboxes, 3, "gt_bboxes", "(B, M, 4)")
    _checks.last_dim(gt_bboxes, 4, "gt_bboxes", "pixels x1, y1, x2, y2")
    b, a, _ = pred_scores.shape
    m = gt_bboxes.shape[1]
    if pred_bboxes.shape[:2] != (b, a) or anchor_points.shape[0] != a:
        raise ValueError(
            f"pred_scores (B, A, nc) = {pred_scores.shape}, pred_bboxes {pred_bboxes.shape} and "
            f"anchor_points {anchor_points.shape} disagree on B or A"
        )
    if gt_bboxes.shape[0] != b or gt_labels.shape != (b, m) or gt_mask.shape != (b, m):
        raise ValueError(
            f"gt_labels {gt_labels.shape} and gt_mask {gt_mask.shape} must be (B, M) = {(b, m)} "
            f"matching gt_bboxes {gt_bboxes.shape} and pred_scores batch {b}"
        )
    dtype = jnp.promote_types(pred_bboxes.dtype, gt_bboxes.dtype)
    return pred_scores, pred_bboxes.astype(dtype), anchor_points, gt_labels, gt_bboxes.astype(dtype), gt_mask


def task_aligned_details(
    pred_scores,
    pred_bboxes,
    anchor_points,
    gt_labels,
    gt_bboxes,
    gt_mask,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    preset: str = "ultralytics",
    topk2: int | None = None,
    strides=(8, 16, 32),
) -> TalAssignment:
    """:func:`task_aligned` plus the intermediate ``(B, M, A)`` metrics (for tests)."""
    pred_scores, pred_bboxes, anchor_points, gt_labels, gt_bboxes, gt_mask = _validate(
        pred_scores, pred_bboxes, anchor_points, gt_labels, gt_bboxes, gt_mask, preset=preset, topk=topk, topk2=topk2
    )
    nc = pred_scores.shape[-1]
    gt_labels = jnp.clip(gt_labels, 0, nc - 1)
    out = assign_core(
        class_scores_at_gts(pred_scores, gt_labels),
        pred_bboxes,
        anchor_points,
        gt_labels,
        gt_bboxes,
        gt_mask,
        topk=topk,
        alpha=alpha,
        beta=beta,
        eps=eps,
        preset=preset,
        topk2=topk2,
        strides=strides,
    )
    one_hot = jax.nn.one_hot(out["target_labels"], nc, dtype=jnp.float32)
    target_scores = one_hot * out["norm"][..., None]
    return TalAssignment(
        out["target_labels"],
        out["target_bboxes"],
        target_scores,
        out["fg_mask"],
        out["target_gt_idx"],
        out["align_metric"],
        out["overlaps"],
        out["mask_pos"],
    )


def task_aligned(
    pred_scores,
    pred_bboxes,
    anchor_points,
    gt_labels,
    gt_bboxes,
    gt_mask,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    preset: str = "ultralytics",
    topk2: int | None = None,
    strides=(8, 16, 32),
):
    """Task-aligned assignment (YOLOv8 ultralytics 8.4.190 / YOLOv9), static shapes.

    Args:
      pred_scores: ``(B, A, nc)`` class **probabilities** (sigmoid already
        applied); no gradient flows through the assigner.
      pred_bboxes: ``(B, A, 4)`` predicted boxes, **pixels** xyxy.
      anchor_points: ``(A, 2)`` anchor centres, **pixels** ``(x, y)``.
      gt_labels: ``(B, M)`` int class ids (padded rows: any value).
      gt_bboxes: ``(B, M, 4)`` GT boxes, **pixels** xyxy.
      gt_mask: ``(B, M)`` bool, True for real GTs.
      topk: candidates kept per GT (upstream ``tal_topk``, 10 in both losses).
      alpha, beta: exponents of the class score and the CIoU in the metric.
      eps: upstream ``self.eps`` of the score normalisation (the in-GT test
        uses its own ``1e-9`` and CIoU ``1e-7``, as upstream).
      preset: ``"ultralytics"`` or ``"yolov9"`` -- see the module docstring.
      topk2: ultralytics' secondary top-k (``None`` = ``topk``); ignored by
        ``"yolov9"``.
      strides: the model strides; ``"ultralytics"`` enlarges GT sides shorter
        than ``strides[1]`` (``strides[0]`` for one level) for the in-GT test.

    Returns:
      ``(target_labels (B, A) int32, target_bboxes (B, A, 4) px xyxy,
      target_scores (B, A, nc) float32, fg_mask (B, A) bool,
      target_gt_idx (B, A) int32)``, as upstream's ``forward``.  With no valid
      GT everything is zero/False (upstream returns ``num_classes`` as the
      label when ``M == 0``; here ``M`` is static and at least 1, and the
      label of a background anchor is meaningless in both).
    """
    out = task_aligned_details(
        pred_scores,
        pred_bboxes,
        anchor_points,
        gt_labels,
        gt_bboxes,
        gt_mask,
        topk=topk,
        alpha=alpha,
        beta=beta,
        eps=eps,
        preset=preset,
        topk2=topk2,
        strides=strides,
    )
    return out[:5]
