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
tensors.  Each level's class, box and DFL sums share one custom VJP
(``_level_terms``): the forward is reductions only (the class term uses
``sum(softplus(x)) - sum(s * x[label])``, exact for one-hot targets; the DFL
softmax enters through its log-sum-exp), and the backward recomputes
sigmoid/softmax and writes the level's whole ``(B, A_l, 4*reg_max + nc)``
gradient in one pass instead of storing ``(B, A, nc)`` residuals.
``reg_max = 1`` (ultralytics' DFL-free branch, YOLO26) takes a plain
autodiff path instead: the first 4 channels are the ltrb distances in grid
units, decoded directly; the third term is ``l1`` (upstream ``l1_loss``)::

    l1 = sum_fg mean_ltrb |pred_ltrb - target_ltrb| * stride / (W, H, W, H) * w / tss

(both sides times their level's stride, then x distances divided by the
image width and y distances by the height, as upstream's ``BboxLoss``; the
target distances are not clamped), scaled by the ``dfl`` gain.

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
* bad class ids cannot raise under ``jit``: the total and its gradients
  become NaN instead (outside ``jit`` they raise ``ValueError``); so does a
  non-finite box in a real row (:meth:`Targets.invalid`).
* hostile DFL logits: the box and DFL terms read the foreground only, as
  upstream.  Their background entries are selected away (double where, also
  inside the fused backward), so a NaN/inf in the DFL channels of an anchor
  outside the foreground changes neither the value nor any gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo import _checks
from jaxyolo._math import clamp, nan_if
from jaxyolo.assign.tal import PRESETS, assign_core, class_scores_at_gts, resolve_batched
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
      reg_max: DFL bins per side (Detect's ``reg_max``, 16); 1 = no DFL, the
        box channels are ltrb distances and the third term is the L1 loss
        (YOLO26; ``preset="ultralytics"`` only).
      box, cls, dfl: loss gains (ultralytics ``hyp.box/cls/dfl``; YOLOv9
        hard-codes 7.5 / 0.5 / 1.5); ``dfl`` scales the L1 term when
        ``reg_max == 1``.
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
        if _checks.positive_int(self.reg_max, "config.reg_max") == 1 and self.preset != "ultralytics":
            raise ValueError(f"config.reg_max = 1 (no DFL) is ultralytics' branch; preset {self.preset!r} has DFL only")
        if self.class_weights is not None and not isinstance(self.class_weights, tuple):
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))


# --- the dense per-level terms -------------------------------------------------
# The loss touches two big dense tensors per level: the head output (B, A_l, C)
# (C = 4*reg_max + nc: DFL logits, then class logits) and its gradient.  On CPU
# the cost is dominated by how many (B, A_l, C)-sized intermediates XLA
# materialises, so the three dense terms of a level (class BCE, DFL, and the
# expectation behind the decoded box) share one custom VJP whose forward is
# reductions only and whose backward writes the whole level gradient in one
# fused pass, recomputing sigmoid / softmax from the logits instead of storing
# them.  Measured on the benchmark (B=16, 640x640, nc=80, 2-core CPU) this
# takes XLA's temporary memory for level 0 from 145 MB to 14 MB.


def _onehot_targets(labels, scores, nc, smoothing):
    """``(B, A, nc)`` soft one-hot targets ``one_hot(labels) * scores`` (+ smoothing)."""
    t = jnp.where(jnp.arange(nc, dtype=labels.dtype) == labels[..., None], scores[..., None], 0.0)
    if smoothing:
        t = t * (1.0 - smoothing) + 0.5 * smoothing
    return t


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


def _dfl_stats(dist):
    """Expected bin and log-sum-exp of ``(B, A, 4, reg_max)`` DFL logits, no gradient.

    Three plain reductions (max; sum of ``exp(x - max)``; sum of ``bin *
    exp(x - lse)``) so that no ``(B, A, 4, reg_max)`` softmax is materialised.
    Returns ``(mean, lse)``, both ``(B, A, 4)``; ``mean`` equals
    :func:`_dfl_expectation` to a few float32 ulps.
    """
    dist = jax.lax.stop_gradient(dist)
    m = jnp.max(dist, axis=-1, keepdims=True)
    lse = m + jnp.log(jnp.sum(jnp.exp(dist - m), axis=-1, keepdims=True))
    bins = jnp.arange(dist.shape[-1], dtype=dist.dtype)
    return jnp.sum(jnp.exp(dist - lse) * bins, axis=-1), lse[..., 0]


def _dfl_bins(target, reg_max):
    """Left bin ``floor(t)`` (int32) and the weights ``w_l``, ``w_r`` of bins ``t_l`` and
    ``t_l + 1`` for a target clamped to ``[0, reg_max - 1 - 0.01]`` (upstream ``DFLoss``)."""
    target = clamp(target, 0.0, reg_max - 1 - 0.01)
    tl = target.astype(jnp.int32)  # non-negative: trunc == floor, as torch's .long()
    wl = (tl + 1) - target
    return tl, wl, 1 - wl


def _box_sum(mean, anchors, tbox, weight, fg, convention):
    """``sum_fg (1 - CIoU(decode(mean), tbox)) * weight`` over one level (grid units).

    Background entries get a benign box pair before the IoU (double where), so
    the gradient w.r.t. ``mean`` is exactly 0 there whatever they hold."""
    mean = jnp.where(fg[..., None], mean, 1.0)
    tbox = jnp.where(fg[..., None], tbox, jnp.concatenate([anchors - 1.0, anchors + 1.0], axis=-1))
    iou = bbox_iou(dist2bbox(mean, anchors, xywh=False), tbox, xywh=False, kind="ciou", convention=convention)
    return jnp.sum(jnp.where(fg, (1.0 - iou) * weight, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _level_terms(static, f, mean, lse, anchors, labels, scores, tbox, fg):
    """Unnormalised ``(cls, box, dfl)`` sums of one level.

    Args:
      static: ``(reg_max, convention, with_cls, class_weights)``; with
        ``with_cls=False`` the class sum is 0 and the class channels get no
        gradient here (the caller adds its own class loss).
      f: ``(B, A_l, 4*reg_max + nc)`` float32 logits, DFL bins ltrb-major first.
      mean, lse: ``(B, A_l, 4)`` :func:`_dfl_stats` of ``f`` (no gradient:
        the gradient through the decoded box is produced here).
      anchors: ``(A_l, 2)`` anchor centres, grid units.
      labels: ``(B, A_l)`` int32 assigned class; scores: ``(B, A_l)`` target
        score of that class (0 off the foreground), also the box/DFL weight.
      tbox: ``(B, A_l, 4)`` assigned GT box, xyxy grid units; fg: ``(B, A_l)`` bool.

    The class sum uses ``(1 - t) x + softplus(-x) = softplus(x) - t x`` (exact
    for one-hot targets): ``sum(w softplus(x)) - sum(s w[label] x[label])``,
    with the softplus summed over the class channels (a slice XLA fuses into
    the reduction; a 0/1 channel mask over whole rows would let ``0 * NaN`` of a
    DFL logit in).  The DFL per side is
    upstream's ``CE(t_l) w_l + CE(t_r) w_r`` with ``CE(t) = lse - x[t]``.
    """
    return _level_terms_fwd(static, f, mean, lse, anchors, labels, scores, tbox, fg)[0]


def _channel_weights(static, c):
    reg_max, _, with_cls, class_weights = static
    w = np.zeros(c, np.float32)
    if with_cls:
        w[4 * reg_max :] = 1.0 if class_weights is None else np.asarray(class_weights, np.float32)
    return w


def _level_terms_fwd(static, f, mean, lse, anchors, labels, scores, tbox, fg):
    reg_max, convention, with_cls, class_weights = static
    cls_sum = jnp.float32(0.0)
    if with_cls:
        cw = _channel_weights(static, f.shape[-1])
        fc = f[..., 4 * reg_max :]
        sp = jnp.maximum(fc, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(fc)))
        at_label = jnp.take_along_axis(f, (labels + 4 * reg_max)[..., None], axis=-1)[..., 0]
        label_w = jnp.asarray(cw)[labels + 4 * reg_max]
        # the class channels only (not whole rows times a 0/1 channel mask: 0 * NaN
        # would let a NaN/inf DFL logit reach the class sum); XLA fuses the slice
        cls_sum = jnp.sum(sp * cw[4 * reg_max :]) - jnp.sum(scores * label_w * at_label)
    tl, wl, wr = _dfl_bins(bbox2dist(anchors, tbox, reg_max - 1), reg_max)
    side = jnp.arange(4, dtype=jnp.int32) * reg_max
    xl = jnp.take_along_axis(f, tl + side, axis=-1)
    xr = jnp.take_along_axis(f, tl + 1 + side, axis=-1)
    dfl = (lse - xl) * wl + (lse - xr) * wr  # (B, A_l, 4)
    dfl_sum = jnp.sum(jnp.where(fg, jnp.mean(dfl, axis=-1) * scores, 0.0))  # not 0 * NaN off fg
    box_sum = _box_sum(mean, anchors, tbox, scores, fg, convention)
    return (cls_sum, box_sum, dfl_sum), (f, mean, lse, anchors, labels, scores, tbox, fg)


def _level_terms_bwd(static, res, ct):
    reg_max, convention, with_cls, _ = static
    f, mean, lse, anchors, labels, scores, tbox, fg = res
    g_cls, g_box, g_dfl = ct
    b, a, c = f.shape
    nc = c - 4 * reg_max
    # (B, A_l, 4) per-side factors: d box / d mean, the DFL weight, the target bins
    g_mean = jax.grad(_box_sum)(mean, anchors, tbox, scores, fg, convention) * g_box
    g_side = jnp.broadcast_to((g_dfl / 4) * scores[..., None], (b, a, 4))
    tl, wl, wr = _dfl_bins(bbox2dist(anchors, tbox, reg_max - 1), reg_max)
    small = (g_mean, g_side, mean, lse, tl, wl, wr, labels, g_cls * scores, fg)
    # The barrier keeps XLA from sharing the recomputed exp/softmax with the
    # forward's (which would materialise them) and from recomputing the small
    # per-side factors once per bin inside the big fusion.
    f, small = jax.lax.optimization_barrier((f, small))
    g_mean, g_side, mean, lse, tl, wl, wr, labels, g_target, fg = small
    cw = _channel_weights(static, c)
    bins = jnp.arange(reg_max, dtype=jnp.int32)

    def dfl_grad(x):  # x (B, A_l, 4, reg_max)
        p = jnp.exp(x - lse[..., None])
        t = jnp.where(bins == tl[..., None], wl[..., None], 0.0) + jnp.where(bins == tl[..., None] + 1, wr[..., None], 0.0)
        g = g_side[..., None] * (p - t) + g_mean[..., None] * p * (bins.astype(p.dtype) - mean[..., None])
        return jnp.where(fg[..., None, None], g, 0.0)  # off fg: 0, not 0 * NaN

    def cls_grad(x, chan, w):  # x (B, A_l, ...) class logits, chan their class ids, w their weights
        if not with_cls:
            return jnp.zeros_like(x)
        e = jnp.exp(-jnp.abs(x))
        sig = jnp.where(x >= 0, 1.0, e) / (1.0 + e)
        lab = labels.reshape(labels.shape + (1,) * (x.ndim - 2))
        tgt = g_target.reshape(lab.shape)
        return w * (g_cls * sig - jnp.where(chan == lab, tgt, 0.0))

    if c % reg_max == 0:
        # Channels as (G, reg_max) groups: the DFL sides are groups 0..3 and the
        # class channels the rest, so the level gradient is one concatenation
        # along G that XLA emits as a single pass over the output.
        g = c // reg_max
        v = f.reshape(b, a, g, reg_max)
        chan = jnp.arange(nc, dtype=jnp.int32).reshape(g - 4, reg_max)
        w = jnp.asarray(cw[4 * reg_max :].reshape(g - 4, reg_max))
        grad = jnp.concatenate([dfl_grad(v[:, :, :4]), cls_grad(v[:, :, 4:], chan, w)], axis=2).reshape(b, a, c)
    else:
        v = f[..., : 4 * reg_max].reshape(b, a, 4, reg_max)
        chan = jnp.arange(nc, dtype=jnp.int32)
        grad = jnp.concatenate(
            [dfl_grad(v).reshape(b, a, 4 * reg_max), cls_grad(f[..., 4 * reg_max :], chan, jnp.asarray(cw[4 * reg_max :]))],
            axis=-1,
        )
    zero = jnp.zeros_like
    return (grad, zero(mean), zero(lse), zero(anchors), np.zeros(labels.shape, jax.dtypes.float0), zero(scores),
            zero(tbox), np.zeros(fg.shape, jax.dtypes.float0))


_level_terms.defvjp(_level_terms_fwd, _level_terms_bwd)


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
      reg_max: DFL bins per side; 1: the first 4 channels are ltrb distances
        in grid units (no DFL, YOLO26).

    Returns:
      dict with per-level lists ``pred_dist`` ``(B, A_l, 4, reg_max)`` and
      ``pred_scores`` ``(B, A_l, nc)`` logits (levels are kept apart so that
      no ``(B, A, nc)`` concatenation is materialised), and concatenated
      ``pred_bboxes (B, A, 4)`` xyxy **grid units**, ``anchor_points (A, 2)``
      grid units, ``stride (A, 1)`` pixels, ``imgsz (h, w)`` pixels (level 0's
      shape times ``strides[0]``, as upstream), ``sizes`` (``A_l`` per level).
    """
    preds = _check_preds(preds, strides, reg_max, None)
    d = _decode(preds, strides, reg_max, for_loss=False)
    return {k: v for k, v in d.items() if k not in ("flat", "level_stats")}


def _decode(preds, strides, reg_max, *, for_loss):
    """:func:`decode_predictions` on checked levels.  With ``for_loss`` the
    expected bins come from :func:`_dfl_stats` (no gradient; the loss's dense
    terms carry it) and the dict also holds the flat ``(B, A_l, C)`` levels
    (``flat``) and each level's ``(mean, lse)`` (``level_stats``)."""
    b, c = preds[0].shape[0], preds[0].shape[-1]
    flat = [p.reshape(b, -1, c) for p in preds]
    pred_dist = [f[..., : 4 * reg_max].reshape(b, -1, 4, reg_max) for f in flat]
    pred_scores = [f[..., 4 * reg_max :] for f in flat]
    shapes = [tuple(p.shape[1:3]) for p in preds]
    anchor_points, stride = make_anchor_points(shapes, strides)
    if reg_max == 1:  # no DFL: the box channels are the ltrb distances themselves
        level_stats = None
        ltrb = jnp.concatenate([f[..., :4] for f in flat], axis=1)  # (B, A, 4) grid units
    elif for_loss:
        level_stats = [_dfl_stats(d) for d in pred_dist]
        ltrb = jnp.concatenate([mean for mean, _ in level_stats], axis=1)
    else:
        level_stats = None
        ltrb = jnp.concatenate([_dfl_expectation(d) for d in pred_dist], axis=1)  # (B, A, 4) grid units
    pred_bboxes = dist2bbox(ltrb, anchor_points, xywh=False)
    imgsz = (shapes[0][0] * strides[0], shapes[0][1] * strides[0])
    return dict(
        flat=flat,
        level_stats=level_stats,
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


def assign_for_loss(d, targets: Targets, *, strides, config: TalLossConfig, batched: bool = False):
    """Run the assigner inside the loss (no gradient): returns :func:`assign_core`'s dict.

    The class probabilities enter only at each GT's class: the ``(B, M, A)``
    logits are gathered per level and the sigmoid applied to those, which is
    elementwise-identical to upstream's ``sigmoid`` of the whole ``(B, A, nc)``.
    ``batched`` selects the top-k of the accelerator path (same results).
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
        batched=batched,
    )


def _class_weight_array(config):
    return jnp.float32(1.0) if config.class_weights is None else jnp.asarray(config.class_weights, jnp.float32)


def _elementwise_cls_sum(logits, lab, sc, fg, config, nc, cw):
    """Sum of the non-fused class losses over one level, by autodiff.

    ``logits (B, A_l, nc)``; ``lab``, ``sc``, ``fg`` ``(B, A_l)`` as :func:`_level_terms`."""
    t = _onehot_targets(lab, sc, nc, float(config.label_smoothing))
    if config.cls_loss == "varifocal":
        el = varifocal_loss(logits, t, _onehot_targets(lab, fg.astype(jnp.float32), nc, 0.0))
    else:
        pos_weight = None if config.cls_pw == 1.0 else jnp.float32(config.cls_pw)
        if config.fl_gamma > 0:
            el = focal_loss(logits, t, gamma=config.fl_gamma, alpha=0.25, pos_weight=pos_weight)
        else:
            el = bce_with_logits(logits, t, pos_weight=pos_weight)
    return jnp.sum(el * cw)


def _l1_terms(d, a, target_bboxes, tss, *, config, fused_bce, nc):
    """The gained ``(box, cls, l1)`` of the ``reg_max == 1`` branch (plain autodiff).

    ``d``: :func:`_decode` of ``(B, H_l, W_l, 4 + nc)`` levels; ``a``: the
    assignment; ``target_bboxes (B, A, 4)`` xyxy grid units; ``tss`` the
    clamped target-score sum.  Per level: the class BCE (as
    :func:`_level_terms`' forward when ``fused_bce``), CIoU on the decoded
    ltrb, and upstream's L1 on ``ltrb * stride / (W, H, W, H)``.
    """
    h, w = d["imgsz"]
    sizes = d["sizes"]
    cw = _class_weight_array(config)
    cls_sum = box_sum = l1_sum = jnp.float32(0.0)
    anchors = _split(d["anchor_points"], sizes, axis=0)
    strides = _split(d["stride"], sizes, axis=0)
    for f, anc, st, lab, sc, tb, fg in zip(
        d["flat"], anchors, strides, *(_split(x, sizes) for x in (a["target_labels"], a["norm"], target_bboxes, a["fg_mask"]))
    ):
        logits = f[..., 4:]  # (B, A_l, nc)
        if fused_bce:
            sp = jnp.maximum(logits, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(logits)))
            at_label = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
            label_w = cw if config.class_weights is None else cw[lab]
            cls_sum = cls_sum + jnp.sum(sp * cw) - jnp.sum(sc * label_w * at_label)
        else:
            cls_sum = cls_sum + _elementwise_cls_sum(logits, lab, sc, fg, config, nc, cw)
        ltrb = jnp.where(fg[..., None], f[..., :4], 1.0)  # off fg: a benign value, not 0 * NaN
        box_sum = box_sum + _box_sum(ltrb, anc, tb, sc, fg, config.preset)
        # (B, A_l, 4): upstream multiplies by the stride, then divides x by W and y by H
        img = jnp.asarray([w, h, w, h], jnp.float32)
        pred_n = (ltrb * st) / img
        tgt_n = (bbox2dist(anc, tb) * st) / img
        l1 = jnp.mean(jnp.abs(pred_n - tgt_n), axis=-1) * sc
        l1_sum = l1_sum + jnp.sum(jnp.where(fg, l1, 0.0))
    return box_sum / tss * config.box, cls_sum / tss * config.cls, l1_sum / tss * config.dfl


def yolov8_loss(
    preds,
    targets: Targets,
    *,
    strides=(8, 16, 32),
    config: TalLossConfig = TalLossConfig(),
    nc=None,
    batched: bool | None = None,
):
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
      batched: assignment path.  ``None`` (default): auto from the backend,
        ``jax.default_backend()`` at trace time (the accelerator path on
        gpu/tpu, the CPU path on cpu); ``True``/``False`` force the
        accelerator/CPU path.  Both give identical values, gradients and
        assignments.  Here the accelerator path takes each GT's top-k
        anchors by k rounds of row maxima over the whole ``(B, M, A)``
        block instead of ``lax.top_k`` + scatter.

    Returns:
      ``(total, components)``: ``total`` scalar float32 ``(box + cls + dfl) * B``
      (NaN if a real target has a class id outside ``[0, nc)`` under jit);
      ``components`` dict of scalar ``"box"``, ``"cls"``, ``"dfl"`` (gains
      applied, not multiplied by B, gradients stopped); ``"l1"`` instead of
      ``"dfl"`` when ``config.reg_max == 1`` (upstream's ``l1_loss``).
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

    # DFL statistics once per level (no gradient): the expected bins decode the
    # boxes the assigner scores, and they are reused by the dense terms below.
    d = _decode(preds, strides, reg_max, for_loss=True)
    sizes = d["sizes"]
    a = assign_for_loss(d, targets, strides=strides, config=config, batched=resolve_batched(batched))
    fg_mask, norm, target_labels = a["fg_mask"], a["norm"], a["target_labels"]
    target_bboxes = a["target_bboxes"] / d["stride"]  # grid units
    # sum of the one-hot target scores (each foreground anchor holds its norm once)
    tss = jnp.maximum(jnp.sum(norm), 1.0)

    fused_bce = (
        config.cls_loss == "bce" and config.cls_pw == 1.0 and config.fl_gamma <= 0 and not config.label_smoothing
    )
    convention = config.preset  # each preset's bbox_iou convention has the preset's name
    if reg_max == 1:
        box, cls, l1 = _l1_terms(d, a, target_bboxes, tss, config=config, fused_bce=fused_bce, nc=nc)
        total = nan_if(targets.invalid(nc), (box + cls + l1) * b)
        components = {k: jax.lax.stop_gradient(v) for k, v in (("box", box), ("cls", cls), ("l1", l1))}
        return total, components
    static = (reg_max, convention, fused_bce, config.class_weights)
    cw = _class_weight_array(config)
    cls_sum = box_sum = dfl_sum = jnp.float32(0.0)
    anchors = _split(d["anchor_points"], sizes, axis=0)
    for f, (mean, lse), anc, lab, sc, tb, fg in zip(
        d["flat"], d["level_stats"], anchors, *(_split(x, sizes) for x in (target_labels, norm, target_bboxes, fg_mask))
    ):
        c_l, b_l, d_l = _level_terms(static, f, mean, lse, anc, lab, sc, tb, fg)
        cls_sum, box_sum, dfl_sum = cls_sum + c_l, box_sum + b_l, dfl_sum + d_l
        if not fused_bce:
            cls_sum = cls_sum + _elementwise_cls_sum(f[..., 4 * reg_max :], lab, sc, fg, config, nc, cw)
    loss_cls, loss_box, loss_dfl = cls_sum / tss, box_sum / tss, dfl_sum / tss

    box, cls, dfl = loss_box * config.box, loss_cls * config.cls, loss_dfl * config.dfl
    total = (box + cls + dfl) * b
    total = nan_if(targets.invalid(nc), total)
    components = {k: jax.lax.stop_gradient(v) for k, v in (("box", box), ("cls", cls), ("dfl", dfl))}
    return total, components
