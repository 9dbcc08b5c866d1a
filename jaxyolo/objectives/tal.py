"""The YOLOv8 / YOLOv9 detection loss: task-aligned assignment + BCE + CIoU + DFL.

Matches ultralytics 8.4.190 ``v8DetectionLoss`` (``preset="ultralytics"``) and
YOLOv9's ``utils/loss_tal.py`` ``ComputeLoss`` (``preset="yolov9"``) to float32
precision, values and gradients.

Pipeline (per batch, all static shapes)::

    preds (B, H_l, W_l, 4*reg_max + nc) per level  ->  (B, A_l, ...) per level
    DFL logits --softmax . arange(reg_max)--> ltrb (grid units) --> xyxy (grid units)
    assigner(sigmoid(cls), boxes * stride, anchors * stride, GTs in pixels)
    target boxes / stride  (grid units: DFL targets are bin indices)
    cls = sum BCE(cls logits, target_scores) / max(sum target_scores, 1)
    box = sum_fg (1 - CIoU(pred, target)) * w / tss,  w = sum_c target_scores
    dfl = sum_fg mean_ltrb DFL(pred_dist, bbox2dist(target, reg_max - 1)) * w / tss
    total = (box_gain * box + cls_gain * cls + dfl_gain * dfl) * B

Upstream returns ``(loss * B, loss.detach())`` (ultralytics: the 3-vector times
B, summed by the trainer; YOLOv9: ``loss.sum() * B``); here ``total`` is that
scalar sum and ``components`` is the detached, gained, *not* batch-multiplied
``{"box", "cls", "dfl"}``.

Why the targets are divided by the stride (and not the predictions multiplied):
the DFL targets are bin indices of the ``reg_max`` softmax, i.e. distances in
grid cells of the anchor's own level -- in pixels they would be clamped to
``reg_max - 1`` cells' worth of pixels and lose every box larger than 15 px.
CIoU is scale-invariant, so the box term does not care which unit is used.
(``tests/test_tal_properties.py`` shows both facts.)

Implementation notes: levels are never concatenated along A for the big
tensors; the class term uses ``sum(softplus(x)) - sum(s * x[label])`` (exact for
one-hot targets) and the class/DFL/decode terms have custom VJPs that recompute
sigmoid/softmax in the backward instead of storing ``(B, A, nc)`` residuals.
``reg_max = 1`` (ultralytics' L1 branch without DFL) is not supported.

Upstream quirks, named once:

* ``label_smoothing``: YOLOv9 computes ``smooth_BCE`` targets and never uses
  them; ultralytics has no such option.  Here it is applied (``t * (1 - eps) +
  eps / 2``) when non-zero -- a deliberate deviation behind a flag; the
  default 0 matches both upstreams.
* an anchor that the top-k picks with zero alignment (a GT holding fewer than
  ``topk`` positive candidates; the pick order among zeros is implementation
  defined) is foreground with target score 0: it adds nothing to BCE/box/DFL,
  but it does count in the varifocal one-hot label and in the multi-GT
  resolution, as upstream.
* YOLOv9's ``cls_pw`` is a BCE ``pos_weight`` (default 1.0: no-op); ``fl_gamma
  > 0`` wraps the BCE in YOLOv5's focal loss (``alpha=0.25``).
* ``cls_loss="varifocal"`` is the "VFL way" line YOLOv9 ships commented out:
  ``VFL(cls logits, target_scores, one-hot target labels).sum() / tss``.
* ``class_weights`` (ultralytics 8.4 ``model.class_weights``) multiplies the
  per-class BCE before the sum.
* bad class ids cannot raise under ``jit``: the total becomes NaN instead
  (outside ``jit`` they raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo import _checks
from jaxyolo._math import clamp
from jaxyolo.assign.tal import PRESETS, assign_core, class_scores_at_gts
from jaxyolo.boxes import bbox2dist, bbox_iou, dist2bbox, make_anchor_points, xywh2xyxy
from jaxyolo.losses import bce_with_logits, focal_loss, varifocal_loss
from jaxyolo.targets import Targets

CLS_LOSSES = ("bce", "varifocal")

__all__ = ["CLS_LOSSES", "TalLossConfig", "assign_for_loss", "decode_predictions", "gt_pixels", "yolov8_loss"]


@dataclasses.dataclass(frozen=True)
class TalLossConfig:
    """Hyperparameters of :func:`yolov8_loss` (hashable: a static jit argument).

    Attributes:
      preset: ``"ultralytics"`` (8.4.190 ``v8DetectionLoss``) or ``"yolov9"``
        (``utils/loss_tal.py``); selects the assigner preset and the CIoU
        convention of the box loss.
      topk, topk2, alpha, beta: assigner settings (``tal_topk``, ``tal_topk2``,
        0.5, 6.0 in both upstream losses).
      reg_max: DFL bins per side (Detect's ``reg_max``, 16).  Must be >= 2.
      box, cls, dfl: loss gains (ultralytics ``hyp.box/cls/dfl``; YOLOv9
        hard-codes 7.5 / 0.5 / 1.5).
      cls_pw: BCE positive weight (YOLOv9 ``hyp["cls_pw"]``).
      label_smoothing: see the module docstring (not applied by either upstream).
      fl_gamma: focal-loss gamma around the BCE when > 0 (YOLOv9 ``hyp["fl_gamma"]``).
      cls_loss: ``"bce"`` or ``"varifocal"``.
      class_weights: optional per-class BCE weights, a tuple of ``nc`` floats
        (ultralytics ``model.class_weights``).
    """

    preset: str = "ultralytics"
    topk: int = 10
    topk2: int | None = None
    alpha: float = 0.5
    beta: float = 6.0
    reg_max: int = 16
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    cls_pw: float = 1.0
    label_smoothing: float = 0.0
    fl_gamma: float = 0.0
    cls_loss: str = "bce"
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        _checks.choice(self.preset, PRESETS, "config.preset")
        _checks.choice(self.cls_loss, CLS_LOSSES, "config.cls_loss")
        _checks.positive_int(self.topk, "config.topk")
        if self.topk2 is not None:
            _checks.positive_int(self.topk2, "config.topk2")
        if _checks.positive_int(self.reg_max, "config.reg_max") < 2:
            raise ValueError(f"config.reg_max must be >= 2 (DFL), got {self.reg_max}")
        if self.class_weights is not None and not isinstance(self.class_weights, tuple):
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))


# --- fused elementwise pieces ------------------------------------------------
# The loss touches three big dense tensors per level: the class logits
# (B, A_l, nc), the DFL logits (B, A_l, 4, reg_max) and their gradients.  On CPU
# the cost is dominated by materialising intermediates of that size, so the
# three dense terms below have custom VJPs whose backward *recomputes* the cheap
# elementwise quantities (softmax, sigmoid, one-hot targets) from the inputs
# instead of saving them; XLA then fuses each gradient straight into the output.


def _onehot_targets(labels, scores, nc, smoothing):
    """``(B, A, nc)`` soft one-hot targets ``one_hot(labels) * scores`` (+ smoothing)."""
    t = jnp.where(jnp.arange(nc, dtype=labels.dtype) == labels[..., None], scores[..., None], 0.0)
    if smoothing:
        t = t * (1.0 - smoothing) + 0.5 * smoothing
    return t


def _bce_terms(logits, targets):
    """torch's ``BCEWithLogits`` value ``(1 - t) x + max(-x, 0) + log1p(exp(-|x|))``
    and gradient ``sigmoid(x) - t`` sharing one ``exp``."""
    e = jnp.exp(-jnp.abs(logits))
    value = (1 - targets) * logits + jnp.maximum(-logits, 0.0) + jnp.log1p(e)
    grad = jnp.where(logits >= 0, 1.0, e) / (1.0 + e) - targets
    return value, grad


@jax.custom_vjp
def _bce_onehot_sum(logits, labels, scores, weights):
    """``sum(w[c] * BCE(logits, one_hot(labels) * scores))`` over ``(B, A, nc)``.

    With one-hot targets ``(1 - t) x + softplus(-x) = softplus(x) - t x``, so the
    sum is ``sum(w softplus(x)) - sum(s w[label] x[label])``: the dense part has
    no targets at all (the per-element value of every zero-target entry is
    bit-identical to torch's formula) and the target part is a ``(B, A)``
    gather.  Gradient ``w (sigmoid(x) - t)``, recomputed in the backward.
    ``weights`` is ``(nc,)`` or ``None`` (all ones).
    """
    e = jnp.exp(-jnp.abs(logits))
    sp = jnp.maximum(logits, 0.0) + jnp.log1p(e)
    at_label = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if weights is None:
        return jnp.sum(sp) - jnp.sum(scores * at_label)
    return jnp.sum(weights * sp) - jnp.sum(scores * weights[labels] * at_label)


def _bce_onehot_fwd(logits, labels, scores, weights):
    return _bce_onehot_sum(logits, labels, scores, weights), (logits, labels, scores, weights)


def _bce_onehot_bwd(res, ct):
    logits, labels, scores, weights = res
    t = _onehot_targets(labels, scores, logits.shape[-1], 0.0)
    grad = _bce_terms(logits, t)[1]
    grad = ct * grad if weights is None else ct * weights * grad
    dw = None if weights is None else jnp.zeros_like(weights)
    return grad, np.zeros(labels.shape, jax.dtypes.float0), jnp.zeros_like(scores), dw


_bce_onehot_sum.defvjp(_bce_onehot_fwd, _bce_onehot_bwd)


@jax.custom_vjp
def _dfl_expectation(dist):
    """``(..., 4)`` expected bin ``sum(softmax(dist) * arange(reg_max))`` of ``(..., 4, reg_max)`` logits
    (upstream ``softmax(3).matmul(proj)``).  Gradient ``p (bin - expectation) g``."""
    p = jax.nn.softmax(dist, axis=-1)
    return jnp.sum(p * jnp.arange(dist.shape[-1], dtype=p.dtype), axis=-1)


def _dfl_expectation_fwd(dist):
    out = _dfl_expectation(dist)
    return out, (dist, out)


def _dfl_expectation_bwd(res, g):
    dist, mean = res
    p = jax.nn.softmax(dist, axis=-1)
    bins = jnp.arange(dist.shape[-1], dtype=p.dtype)
    return (g[..., None] * p * (bins - mean[..., None]),)


_dfl_expectation.defvjp(_dfl_expectation_fwd, _dfl_expectation_bwd)


def _dfl_bin_weights(target, reg_max):
    """``(..., reg_max)`` weights ``w_l`` at ``floor(t)`` and ``w_r`` at ``floor(t) + 1``
    for a target clamped to ``[0, reg_max - 1 - 0.01]`` (upstream ``DFLoss``)."""
    target = clamp(target, 0.0, reg_max - 1 - 0.01)
    tl = target.astype(jnp.int32)  # non-negative: trunc == floor, as torch's .long()
    wl = (tl + 1) - target
    wr = 1 - wl
    bins = jnp.arange(reg_max, dtype=jnp.int32)
    left = jnp.where(bins == tl[..., None], wl[..., None], 0.0)
    return left + jnp.where(bins == tl[..., None] + 1, wr[..., None], 0.0)


@jax.custom_vjp
def _dfl_per_side(dist, target):
    """DFL per side ``-(w_l log p[t_l] + w_r log p[t_r])``, ``(..., 4)``, as upstream
    ``DFLoss`` before its mean over the sides (and :func:`jaxyolo.losses.dfl_loss`).

    The two gathers are a weighted sum over the bins (exact: the other terms
    are zeros); the backward ``g (softmax - w)`` is elementwise.  No gradient
    flows to ``target``.
    """
    w = _dfl_bin_weights(target, dist.shape[-1])
    return -jnp.sum(jax.nn.log_softmax(dist, axis=-1) * w, axis=-1)


def _dfl_per_side_fwd(dist, target):
    return _dfl_per_side(dist, target), (dist, target)


def _dfl_per_side_bwd(res, g):
    dist, target = res
    w = _dfl_bin_weights(target, dist.shape[-1])
    return g[..., None] * (jax.nn.softmax(dist, axis=-1) - w), jnp.zeros_like(target)


_dfl_per_side.defvjp(_dfl_per_side_fwd, _dfl_per_side_bwd)


def _check_preds(preds, strides, reg_max, nc):
    layout = "(B, H, W, 4*reg_max + nc)"
    out = _checks.level_list(preds, "preds", layout)
    if len(out) != len(strides):
        raise ValueError(f"preds has {len(out)} levels but strides has {len(strides)}")
    for i, p in enumerate(out):
        _checks.ndim(p, 4, f"preds[{i}]", layout)
    _checks.levels_agree(out, "preds", "4*reg_max + nc")
    c = out[0].shape[-1]
    h0, w0 = out[0].shape[1:3]
    for i, (p, st) in enumerate(zip(out, strides)):
        want = (-(-(h0 * strides[0]) // st), -(-(w0 * strides[0]) // st))
        if tuple(p.shape[1:3]) != tuple(int(v) for v in want):
            raise ValueError(
                f"preds[{i}] has spatial shape {tuple(p.shape[1:3])} but level 0 {(h0, w0)} at stride "
                f"{strides[0]} implies {tuple(int(v) for v in want)} at stride {st}; levels or strides mismatch"
            )
    if nc is not None and c != 4 * reg_max + nc:
        raise ValueError(f"preds have {c} channels, expected 4*reg_max + nc = 4*{reg_max} + {nc} = {4 * reg_max + nc}")
    if c <= 4 * reg_max:
        raise ValueError(f"preds have {c} channels, expected 4*reg_max + nc > {4 * reg_max} (reg_max={reg_max})")
    return out


def decode_predictions(preds, *, strides=(8, 16, 32), reg_max=16):
    """Split per-level head outputs and decode the DFL boxes.

    Args:
      preds: per level ``(B, H, W, 4*reg_max + nc)`` logits, DFL bins ltrb-major
        first (side 0's ``reg_max`` bins, then side 1's, ...), then classes.
      strides: pixels per cell of each level.
      reg_max: DFL bins per side.

    Returns:
      dict with per-level lists ``pred_dist`` ``(B, A_l, 4, reg_max)`` and
      ``pred_scores`` ``(B, A_l, nc)`` logits (levels are kept apart so that
      no ``(B, A, nc)`` concatenation is materialised), and concatenated
      ``pred_bboxes (B, A, 4)`` xyxy **grid units**, ``anchor_points (A, 2)``
      grid units, ``stride (A, 1)`` pixels, ``imgsz (h, w)`` pixels (level 0's
      shape times ``strides[0]``, as upstream), ``sizes`` (``A_l`` per level).
    """
    preds = _check_preds(preds, strides, reg_max, None)
    b, c = preds[0].shape[0], preds[0].shape[-1]
    flat = [p.reshape(b, -1, c) for p in preds]
    pred_dist = [f[..., : 4 * reg_max].reshape(b, -1, 4, reg_max) for f in flat]
    pred_scores = [f[..., 4 * reg_max :] for f in flat]
    shapes = [tuple(p.shape[1:3]) for p in preds]
    anchor_points, stride = make_anchor_points(shapes, strides)
    ltrb = jnp.concatenate([_dfl_expectation(d) for d in pred_dist], axis=1)  # (B, A, 4) grid units
    pred_bboxes = dist2bbox(ltrb, anchor_points, xywh=False)
    imgsz = (shapes[0][0] * strides[0], shapes[0][1] * strides[0])
    return dict(
        pred_dist=pred_dist,
        pred_scores=pred_scores,
        pred_bboxes=pred_bboxes,
        anchor_points=anchor_points,
        stride=stride,
        imgsz=imgsz,
        sizes=[f.shape[1] for f in flat],
    )


def gt_pixels(targets: Targets, imgsz):
    """``(B, M, 4)`` pixel xyxy GT boxes and the ``(B, M)`` valid mask, as upstream's
    ``preprocess`` (scale normalised cxcywh by ``(w, h)``, then to xyxy; a row
    counts only if its xyxy coordinates sum to more than 0)."""
    h, w = imgsz
    scale = jnp.asarray([w, h, w, h], jnp.float32)
    boxes = xywh2xyxy(targets.boxes * scale)
    mask = targets.mask & (jnp.sum(boxes, axis=-1) > 0)
    return boxes, mask


def _split(x, sizes, axis=1):
    out, start = [], 0
    for n in sizes:
        out.append(jax.lax.slice_in_dim(x, start, start + n, axis=axis))
        start += n
    return out


def assign_for_loss(d, targets: Targets, *, strides, config: TalLossConfig):
    """Run the assigner inside the loss (no gradient): returns :func:`assign_core`'s dict.

    The class probabilities enter only at each GT's class: the ``(B, M, A)``
    logits are gathered per level and the sigmoid applied to those, which is
    elementwise-identical to upstream's ``sigmoid`` of the whole ``(B, A, nc)``.
    """
    nc = d["pred_scores"][0].shape[-1]
    gt_bboxes, gt_mask = gt_pixels(targets, d["imgsz"])
    labels = jnp.clip(targets.classes, 0, nc - 1)
    logits_at_gt = jnp.concatenate(
        [class_scores_at_gts(jax.lax.stop_gradient(s), labels) for s in d["pred_scores"]], axis=2
    )
    return assign_core(
        jax.nn.sigmoid(logits_at_gt),
        jax.lax.stop_gradient(d["pred_bboxes"]) * d["stride"],
        d["anchor_points"] * d["stride"],
        labels,
        gt_bboxes,
        gt_mask,
        topk=config.topk,
        alpha=config.alpha,
        beta=config.beta,
        preset=config.preset,
        topk2=config.topk2,
        strides=strides,
    )


def yolov8_loss(preds, targets: Targets, *, strides=(8, 16, 32), config: TalLossConfig = TalLossConfig(), nc=None):
    """YOLOv8 (ultralytics 8.4.190) / YOLOv9 detection loss.

    Args:
      preds: per level ``(B, H_l, W_l, 4*reg_max + nc)`` raw head outputs
        (channels-last): the ``4*reg_max`` DFL logits ltrb-major first, then
        the ``nc`` class logits.  Any float dtype; computed in float32.
      targets: :class:`jaxyolo.Targets`, ``(B, M)`` padded, normalised cxcywh
        (fractions of the image ``(W, H) = (W_0 * strides[0], H_0 * strides[0])``).
      strides: pixels per cell of each level (Detect's ``stride``).
      config: :class:`TalLossConfig`.
      nc: optional number of classes, to check the channel count exactly.

    Returns:
      ``(total, components)``: ``total`` scalar float32 ``(box + cls + dfl) * B``
      (NaN if a real target has a class id outside ``[0, nc)`` under jit);
      ``components`` dict of scalar ``"box"``, ``"cls"``, ``"dfl"`` (gains
      applied, not multiplied by B, gradients stopped).
    """
    if not isinstance(config, TalLossConfig):
        raise TypeError(f"config must be a TalLossConfig, got {type(config).__name__}")
    strides = tuple(strides)
    reg_max = config.reg_max
    preds = _check_preds(preds, strides, reg_max, nc)
    nc = preds[0].shape[-1] - 4 * reg_max
    targets = Targets.checked(targets, nc=nc, name="targets")
    b = preds[0].shape[0]
    if targets.batch_size != b:
        raise ValueError(f"targets have batch size {targets.batch_size} but preds have {b}")
    if config.class_weights is not None and len(config.class_weights) != nc:
        raise ValueError(f"config.class_weights has {len(config.class_weights)} entries, expected nc={nc}")

    d = decode_predictions(preds, strides=strides, reg_max=reg_max)
    sizes = d["sizes"]
    a = assign_for_loss(d, targets, strides=strides, config=config)
    fg_mask, norm, target_labels = a["fg_mask"], a["norm"], a["target_labels"]
    stride = d["stride"]
    target_bboxes = a["target_bboxes"] / stride  # grid units
    # sum of the one-hot target scores (each foreground anchor holds its norm once)
    tss = jnp.maximum(jnp.sum(norm), 1.0)

    # classification, level by level (never a (B, A, nc) concatenation)
    cw = jnp.float32(1.0) if config.class_weights is None else jnp.asarray(config.class_weights, jnp.float32)
    fused_bce = (
        config.cls_loss == "bce" and config.cls_pw == 1.0 and config.fl_gamma <= 0 and not config.label_smoothing
    )
    cls_sum = jnp.float32(0.0)
    for logits, lab, sc, fg in zip(d["pred_scores"], _split(target_labels, sizes), _split(norm, sizes),
                                   _split(fg_mask, sizes)):
        if fused_bce:
            weights = None if config.class_weights is None else cw
            cls_sum = cls_sum + _bce_onehot_sum(logits, lab, sc, weights)
            continue
        t = _onehot_targets(lab, sc, nc, float(config.label_smoothing))
        if config.cls_loss == "varifocal":
            onehot = _onehot_targets(lab, fg.astype(jnp.float32), nc, 0.0)
            el = varifocal_loss(logits, t, onehot)
        else:
            pos_weight = None if config.cls_pw == 1.0 else jnp.float32(config.cls_pw)
            if config.fl_gamma > 0:
                el = focal_loss(logits, t, gamma=config.fl_gamma, alpha=0.25, pos_weight=pos_weight)
            else:
                el = bce_with_logits(logits, t, pos_weight=pos_weight)
        cls_sum = cls_sum + jnp.sum(el * cw)
    loss_cls = cls_sum / tss

    # box (CIoU, grid units) on the foreground, weight = sum of target scores
    weight = jnp.where(fg_mask, norm, 0.0)
    convention = "ultralytics" if config.preset == "ultralytics" else "yolov5"
    iou = bbox_iou(d["pred_bboxes"], target_bboxes, kind="ciou", convention=convention)
    loss_box = jnp.sum(jnp.where(fg_mask, (1.0 - iou) * weight, 0.0)) / tss

    # DFL: targets in grid units (bins), clamped to reg_max - 1 - 0.01
    target_ltrb = bbox2dist(d["anchor_points"], target_bboxes, reg_max - 1)
    dfl_sum = jnp.float32(0.0)
    for dist, tl, w in zip(d["pred_dist"], _split(target_ltrb, sizes), _split(weight, sizes)):
        dfl_sum = dfl_sum + jnp.sum(jnp.mean(_dfl_per_side(dist, tl), axis=-1) * w)
    loss_dfl = dfl_sum / tss

    box, cls, dfl = loss_box * config.box, loss_cls * config.cls, loss_dfl * config.dfl
    total = (box + cls + dfl) * b
    total = jnp.where(targets.invalid_classes(nc), jnp.nan, total)
    components = {k: jax.lax.stop_gradient(v) for k, v in (("box", box), ("cls", cls), ("dfl", dfl))}
    return total, components
