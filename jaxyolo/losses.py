"""Element-wise detection losses (unreduced), plus explicit reductions.

Every loss returns one value per element, computed in float32 even for
bf16/fp16 inputs; the caller reduces.  Each docstring names the reduction that
reproduces the upstream class, e.g. yolov5's ``FocalLoss(BCEWithLogitsLoss())``
is ``focal_loss(...).mean()`` and ultralytics' ``VarifocalLoss`` is
``varifocal_loss(...).mean(1).sum()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxyolo import _checks
from jaxyolo._math import clamp, safe_div

__all__ = [
    "bce_with_logits",
    "smooth_bce",
    "focal_loss",
    "qfocal_loss",
    "varifocal_loss",
    "bce_blur_loss",
    "dfl_loss",
    "yolox_iou_loss",
    "reduce",
    "masked_mean",
    "masked_sum",
]

REDUCTIONS = ("none", "mean", "sum")


def _logits_and_targets(logits, targets, logits_name="logits", targets_name="targets"):
    logits = _checks.float_array(logits, logits_name)
    targets = _checks.float_array(targets, targets_name)
    _checks.broadcast_batch(logits[..., None], targets[..., None], logits_name, targets_name)
    return logits, targets


def bce_with_logits(logits, targets, *, pos_weight=None):
    """Binary cross-entropy on logits, as ``nn.BCEWithLogitsLoss(reduction="none")``.

    ``loss = (1 - t) x + (1 + (pw - 1) t) softplus(-x)``, stable for any ``x``.

    Args:
      logits: ``(...)`` raw scores.
      targets: ``(...)`` probabilities in ``[0, 1]`` (soft labels allowed),
        broadcasting with ``logits``.
      pos_weight: optional weight of the positive term (upstream ``cls_pw`` /
        ``obj_pw``), broadcasting with the last axis like torch's.

    Returns:
      ``(...)`` unreduced loss; ``.mean()`` is upstream's default reduction.
    """
    logits, targets = _logits_and_targets(logits, targets)
    softplus_neg = jax.nn.softplus(-logits)
    if pos_weight is None:
        return (1 - targets) * logits + softplus_neg
    log_weight = 1 + (jnp.asarray(pos_weight, jnp.float32) - 1) * targets
    return (1 - targets) * logits + log_weight * softplus_neg


def smooth_bce(eps=0.1):
    """Label-smoothing BCE targets ``(positive, negative) = (1 - eps/2, eps/2)``.

    yolov5's ``smooth_BCE``; ``eps`` is the ``label_smoothing`` hyperparameter.
    """
    return 1.0 - 0.5 * eps, 0.5 * eps


def focal_loss(logits, targets, *, gamma=1.5, alpha=0.25, pos_weight=None):
    """Focal loss on logits, as yolov5 ``FocalLoss`` / ultralytics ``FocalLoss``.

    ``bce * alpha_t * (1 - p_t) ** gamma`` with ``p_t = t p + (1 - t)(1 - p)``
    and ``alpha_t = t alpha + (1 - t)(1 - alpha)``.

    Args:
      logits: ``(...)`` raw scores.
      targets: ``(...)`` targets in ``[0, 1]``.
      gamma: focusing exponent (yolov5's ``fl_gamma``).
      alpha: positive/negative balance; ``None`` or ``<= 0`` disables the
        alpha factor (ultralytics' behaviour for ``alpha <= 0``).
      pos_weight: forwarded to :func:`bce_with_logits` (yolov5 wraps a
        ``BCEWithLogitsLoss`` that carries ``cls_pw``/``obj_pw``).

    Returns:
      ``(...)`` unreduced.  yolov5 ``FocalLoss`` = ``.mean()``; ultralytics
      ``FocalLoss`` = ``.mean(1).sum()`` on ``(N, nc)`` inputs.
    """
    logits, targets = _logits_and_targets(logits, targets)
    loss = bce_with_logits(logits, targets, pos_weight=pos_weight)
    prob = jax.nn.sigmoid(logits)
    p_t = targets * prob + (1 - targets) * (1 - prob)
    loss = loss * (1.0 - p_t) ** gamma
    if alpha is not None and alpha > 0:
        loss = loss * (targets * alpha + (1 - targets) * (1 - alpha))
    return loss


def qfocal_loss(logits, targets, *, gamma=1.5, alpha=0.25, pos_weight=None):
    """Quality focal loss, as yolov5 ``QFocalLoss``.

    ``bce * alpha_t * |t - p| ** gamma`` (soft targets welcome).

    Returns:
      ``(...)`` unreduced; yolov5 ``QFocalLoss(BCEWithLogitsLoss())`` = ``.mean()``.
    """
    logits, targets = _logits_and_targets(logits, targets)
    loss = bce_with_logits(logits, targets, pos_weight=pos_weight)
    prob = jax.nn.sigmoid(logits)
    alpha_factor = targets * alpha + (1 - targets) * (1 - alpha)
    return loss * alpha_factor * jnp.abs(targets - prob) ** gamma


def varifocal_loss(pred_logits, gt_score, label, *, alpha=0.75, gamma=2.0):
    """Varifocal loss (Zhang et al. 2020), as ultralytics ``VarifocalLoss``.

    ``bce(pred, gt_score) * (alpha p**gamma (1 - label) + gt_score label)``.
    The weight is *not* detached (neither is it upstream).

    Args:
      pred_logits: ``(...)`` class logits, e.g. ``(B, A, nc)``.
      gt_score: ``(...)`` IoU-aware soft targets (e.g. TAL ``target_scores``).
      label: ``(...)`` one-hot positives (0/1, float or bool).

    Returns:
      ``(...)`` unreduced; ultralytics ``VarifocalLoss`` = ``.mean(1).sum()``
      on ``(B, A, nc)``; YOLOv9's commented-out variant = ``.sum()``.
    """
    pred_logits, gt_score = _logits_and_targets(pred_logits, gt_score, "pred_logits", "gt_score")
    label = jnp.asarray(label).astype(jnp.float32)
    weight = alpha * jax.nn.sigmoid(pred_logits) ** gamma * (1 - label) + gt_score * label
    return bce_with_logits(pred_logits, gt_score) * weight


def bce_blur_loss(logits, targets, *, alpha=0.05):
    """BCE with reduced missing-label effects, as yolov5 ``BCEBlurWithLogitsLoss``.

    ``bce * (1 - exp((p - t - 1) / (alpha + 1e-4)))``: a confident prediction
    on a negative label (``p - t`` near 1) is down-weighted.

    Returns:
      ``(...)`` unreduced; upstream returns ``.mean()``.
    """
    logits, targets = _logits_and_targets(logits, targets)
    loss = bce_with_logits(logits, targets)
    dx = jax.nn.sigmoid(logits) - targets
    return loss * (1 - jnp.exp((dx - 1) / (alpha + 1e-4)))


def dfl_loss(pred_dist, target):
    """Distribution focal loss (Li et al. 2020), as ultralytics ``DFLoss`` per side.

    Cross-entropy of the two bins around a continuous target, weighted by the
    distance to each: ``-(wl log p[tl] + wr log p[tl + 1])``.  The target is
    clamped to ``[0, reg_max - 1 - 0.01]`` first (upstream ``DFLoss``).

    Args:
      pred_dist: ``(..., reg_max)`` bin logits (e.g. ``(N, 4, reg_max)``).
      target: ``(...)`` distances in **bins** (grid units), e.g. ``(N, 4)``
        ltrb from :func:`jaxyolo.boxes.bbox2dist`.  No gradient flows to it.

    Returns:
      ``(...)`` unreduced per-side loss; upstream ``DFLoss`` is ``.mean(-1,
      keepdims=True)`` over the 4 sides.
    """
    pred_dist = _checks.float_array(pred_dist, "pred_dist")
    target = _checks.float_array(target, "target")
    if pred_dist.ndim == 0 or pred_dist.shape[:-1] != target.shape:
        raise ValueError(
            f"pred_dist must be target's shape plus a reg_max axis, got pred_dist {tuple(pred_dist.shape)} "
            f"and target {tuple(target.shape)}"
        )
    reg_max = pred_dist.shape[-1]
    target = clamp(jax.lax.stop_gradient(target), 0.0, reg_max - 1 - 0.01)
    tl = target.astype(jnp.int32)  # non-negative after the clamp: trunc == floor
    wl = (tl + 1) - target
    wr = 1 - wl
    logp = jax.nn.log_softmax(pred_dist, axis=-1)
    logp_l = jnp.take_along_axis(logp, tl[..., None], axis=-1)[..., 0]
    logp_r = jnp.take_along_axis(logp, (tl + 1)[..., None], axis=-1)[..., 0]
    return -(logp_l * wl + logp_r * wr)


def yolox_iou_loss(pred, target, *, kind="iou"):
    """YOLOX ``IOUloss``: ``1 - IoU**2`` (``"iou"``) or ``1 - clamp(GIoU, -1, 1)``.

    Args:
      pred: ``(..., 4)`` cxcywh boxes (YOLOX: pixels).
      target: ``(..., 4)`` cxcywh boxes in the same units.
      kind: ``"iou"`` or ``"giou"``.

    Returns:
      ``(...)`` unreduced; YOLOX's loss uses ``.sum()`` over positives.  The
      intersection is zero unless the boxes overlap on both axes (YOLOX's
      ``en`` mask); the union gets ``+1e-16`` as upstream.
    """
    pred = _checks.float_array(pred, "pred")
    target = _checks.float_array(target, "target")
    _checks.last_dim(pred, 4, "pred", "cx, cy, w, h")
    _checks.last_dim(target, 4, "target", "cx, cy, w, h")
    _checks.broadcast_batch(pred, target, "pred", "target")
    _checks.choice(kind, ("iou", "giou"), "kind")
    p_tl, p_br = pred[..., :2] - pred[..., 2:] / 2, pred[..., :2] + pred[..., 2:] / 2
    t_tl, t_br = target[..., :2] - target[..., 2:] / 2, target[..., :2] + target[..., 2:] / 2
    tl, br = jnp.maximum(p_tl, t_tl), jnp.minimum(p_br, t_br)
    area_p = jnp.prod(pred[..., 2:], axis=-1)
    area_g = jnp.prod(target[..., 2:], axis=-1)
    en = jnp.all(tl < br, axis=-1).astype(tl.dtype)
    area_i = jnp.prod(br - tl, axis=-1) * en
    area_u = area_p + area_g - area_i
    iou = safe_div(area_i, area_u + 1e-16)
    if kind == "iou":
        return 1 - iou**2
    c_tl, c_br = jnp.minimum(p_tl, t_tl), jnp.maximum(p_br, t_br)
    area_c = jnp.prod(c_br - c_tl, axis=-1)
    giou = iou - safe_div(area_c - area_u, clamp(area_c, 1e-16))
    return 1 - clamp(giou, -1.0, 1.0)


def reduce(loss, reduction="mean"):
    """Apply a torch-style ``reduction`` (``"none" | "mean" | "sum"``)."""
    _checks.choice(reduction, REDUCTIONS, "reduction")
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    return loss


def masked_sum(loss, mask, axis=None):
    """Sum of ``loss`` where ``mask`` (broadcast); masked entries contribute
    exactly zero, NaN/inf included (they are selected away, not multiplied)."""
    return jnp.sum(jnp.where(mask, loss, 0.0), axis=axis)


def masked_mean(loss, mask, axis=None):
    """Mean of ``loss`` over the ``mask``-ed entries; 0 where none are selected
    (upstream's "0 for a level with no positives")."""
    mask = jnp.broadcast_to(mask, jnp.shape(loss))
    count = jnp.sum(mask, axis=axis).astype(jnp.float32)
    return safe_div(masked_sum(loss, mask, axis=axis), count)
