"""The YOLOv8 / YOLOv9 detection loss: task-aligned assignment + BCE + CIoU + DFL.

Matches ultralytics 8.4.190 ``v8DetectionLoss`` (``preset="ultralytics"``) and
YOLOv9's ``utils/loss_tal.py`` ``ComputeLoss`` (``preset="yolov9"``) to float32
precision, values and gradients.

Pipeline (per batch, all static shapes)::

    preds (B, H_l, W_l, 4*reg_max + nc) per level  ->  (B, A, ...) concatenated
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
(``tests/test_tal_units.py`` shows both facts.)

Upstream quirks, named once:

* ``label_smoothing``: YOLOv9 computes ``smooth_BCE`` targets and never uses
  them; ultralytics has no such option.  Here it is applied (``t * (1 - eps) +
  eps / 2``) when non-zero; the default 0 matches both upstreams.
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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo import _checks
from jaxyolo.assign.tal import PRESETS, task_aligned
from jaxyolo.boxes import bbox2dist, bbox_iou, dist2bbox, make_anchor_points, xywh2xyxy
from jaxyolo.losses import bce_with_logits, dfl_loss, focal_loss, varifocal_loss
from jaxyolo.targets import Targets

CLS_LOSSES = ("bce", "varifocal")

__all__ = ["CLS_LOSSES", "TalLossConfig", "yolov8_loss", "decode_predictions"]


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


def _check_preds(preds, strides, reg_max, nc):
    if isinstance(preds, (jnp.ndarray, np.ndarray)) or not isinstance(preds, Sequence):
        raise TypeError("preds must be a sequence of per-level (B, H, W, 4*reg_max + nc) arrays")
    if len(preds) == 0 or len(preds) != len(strides):
        raise ValueError(f"preds has {len(preds)} levels but strides has {len(strides)}")
    out = []
    for i, p in enumerate(preds):
        p = _checks.float_array(p, f"preds[{i}]")
        _checks.ndim(p, 4, f"preds[{i}]", "(B, H, W, 4*reg_max + nc)")
        out.append(p.astype(jnp.float32))
    b, c = out[0].shape[0], out[0].shape[-1]
    for i, p in enumerate(out):
        if p.shape[0] != b:
            raise ValueError(f"preds[{i}] has batch {p.shape[0]} but preds[0] has {b}")
        if p.shape[-1] != c:
            raise ValueError(f"preds[{i}] has {p.shape[-1]} channels but preds[0] has {c}; levels must agree")
    if nc is not None and c != 4 * reg_max + nc:
        raise ValueError(f"preds have {c} channels, expected 4*reg_max + nc = 4*{reg_max} + {nc} = {4 * reg_max + nc}")
    if c <= 4 * reg_max:
        raise ValueError(f"preds have {c} channels, expected 4*reg_max + nc > {4 * reg_max} (reg_max={reg_max})")
    return out


def decode_predictions(preds, *, strides=(8, 16, 32), reg_max=16):
    """Flatten per-level head outputs and decode the DFL boxes.

    Args:
      preds: per level ``(B, H, W, 4*reg_max + nc)`` logits, DFL bins ltrb-major
        first (side 0's ``reg_max`` bins, then side 1's, ...), then classes.
      strides: pixels per cell of each level.
      reg_max: DFL bins per side.

    Returns:
      dict with ``pred_dist (B, A, 4, reg_max)`` logits, ``pred_scores (B, A, nc)``
      logits, ``pred_bboxes (B, A, 4)`` xyxy **grid units**, ``anchor_points
      (A, 2)`` grid units, ``stride (A, 1)`` pixels, ``imgsz (h, w)`` pixels
      (level 0's shape times ``strides[0]``, as upstream).
    """
    preds = _check_preds(preds, strides, reg_max, None)
    b, c = preds[0].shape[0], preds[0].shape[-1]
    flat = jnp.concatenate([p.reshape(b, -1, c) for p in preds], axis=1)
    pred_dist = flat[..., : 4 * reg_max].reshape(b, -1, 4, reg_max)
    pred_scores = flat[..., 4 * reg_max :]
    shapes = [tuple(p.shape[1:3]) for p in preds]
    anchor_points, stride = make_anchor_points(shapes, strides)
    proj = jnp.arange(reg_max, dtype=jnp.float32)
    ltrb = jnp.einsum("bajr,r->baj", jax.nn.softmax(pred_dist, axis=-1), proj, precision="highest")
    pred_bboxes = dist2bbox(ltrb, anchor_points, xywh=False)
    imgsz = (shapes[0][0] * strides[0], shapes[0][1] * strides[0])
    return dict(
        pred_dist=pred_dist,
        pred_scores=pred_scores,
        pred_bboxes=pred_bboxes,
        anchor_points=anchor_points,
        stride=stride,
        imgsz=imgsz,
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
    pred_dist, pred_scores, pred_bboxes = d["pred_dist"], d["pred_scores"], d["pred_bboxes"]
    anchor_points, stride = d["anchor_points"], d["stride"]
    gt_bboxes, gt_mask = gt_pixels(targets, d["imgsz"])

    target_labels, target_bboxes, target_scores, fg_mask, _ = task_aligned(
        jax.nn.sigmoid(jax.lax.stop_gradient(pred_scores)),
        jax.lax.stop_gradient(pred_bboxes) * stride,
        anchor_points * stride,
        targets.classes,
        gt_bboxes,
        gt_mask,
        topk=config.topk,
        alpha=config.alpha,
        beta=config.beta,
        preset=config.preset,
        topk2=config.topk2,
        strides=strides,
    )
    target_bboxes = target_bboxes / stride  # grid units
    tss = jnp.maximum(jnp.sum(target_scores), 1.0)

    # classification
    cls_targets = target_scores
    if config.label_smoothing:
        cls_targets = cls_targets * (1.0 - config.label_smoothing) + 0.5 * config.label_smoothing
    if config.cls_loss == "varifocal":
        labels = jnp.where(fg_mask[..., None], jax.nn.one_hot(target_labels, nc, dtype=jnp.float32), 0.0)
        cls_el = varifocal_loss(pred_scores, cls_targets, labels)
    else:
        pos_weight = None if config.cls_pw == 1.0 else jnp.float32(config.cls_pw)
        if config.fl_gamma > 0:
            cls_el = focal_loss(pred_scores, cls_targets, gamma=config.fl_gamma, alpha=0.25, pos_weight=pos_weight)
        else:
            cls_el = bce_with_logits(pred_scores, cls_targets, pos_weight=pos_weight)
    if config.class_weights is not None:
        cls_el = cls_el * jnp.asarray(config.class_weights, jnp.float32)
    loss_cls = jnp.sum(cls_el) / tss

    # box + DFL on the foreground
    weight = jnp.sum(target_scores, axis=-1)  # (B, A)
    convention = "ultralytics" if config.preset == "ultralytics" else "yolov5"
    iou = bbox_iou(pred_bboxes, target_bboxes, kind="ciou", convention=convention)
    loss_box = jnp.sum(jnp.where(fg_mask, (1.0 - iou) * weight, 0.0)) / tss
    target_ltrb = bbox2dist(anchor_points, target_bboxes, reg_max - 1)
    dfl = jnp.mean(dfl_loss(pred_dist, target_ltrb), axis=-1)  # (B, A)
    loss_dfl = jnp.sum(jnp.where(fg_mask, dfl * weight, 0.0)) / tss

    box, cls, dfl = loss_box * config.box, loss_cls * config.cls, loss_dfl * config.dfl
    total = (box + cls + dfl) * b
    total = jnp.where(targets.invalid_classes(nc), jnp.nan, total)
    components = {k: jax.lax.stop_gradient(v) for k, v in (("box", box), ("cls", cls), ("dfl", dfl))}
    return total, components
