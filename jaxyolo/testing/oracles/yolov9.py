"""YOLOv9's ``utils/loss_tal.py`` ``ComputeLoss`` and ``utils/tal/assigner.py``
``TaskAlignedAssigner`` (yolo9==1.0.18, WongKinYiu/yolov9 packaged), called on
channels-last inputs.

The loss is constructed on a minimal fake model exposing exactly what
``ComputeLoss.__init__`` reads: ``parameters()`` (for the device), ``hyp``
(``cls_pw``, ``fl_gamma``, ``label_smoothing``) and ``model[-1]`` (Detect:
``stride``, ``nc``, ``nl``, ``no``, ``reg_max``).  Predictions go in as the
per-level NCHW leaves the loss concatenates, so the gradients come back per
level; targets as the ``(N, 6)`` rows ``[img, cls, cx, cy, w, h]`` of
``Targets.to_rows``.  YOLOv9 reads the assigner's ``topk``/``alpha``/``beta``
from the ``YOLOM``/``YOLOA``/``YOLOB`` environment variables at construction;
here they are set on the constructed assigner instead.  The box/cls/DFL gains
are hard-coded upstream (7.5 / 0.5 / 1.5).

``cls_loss="varifocal"`` runs the "VFL way" line ``ComputeLoss`` ships
commented out: the class criterion is upstream's own ``VarifocalLoss`` on
``(cls logits, target_scores, one-hot target labels on the foreground)``.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np

from jaxyolo.testing.oracles._torch import grad_nhwc, nhwc_to_torch, numpy, tensor, torch, yolov9_modules

__all__ = ["make_yolov9_criterion", "yolov9_assign", "yolov9_loss"]

_ASSIGN_OUTPUTS = ("target_labels", "target_bboxes", "target_scores", "fg_mask")


def _fake_model(*, strides, nc, reg_max, cls_pw, fl_gamma):
    t = torch()
    detect = types.SimpleNamespace(
        stride=t.tensor(strides, dtype=t.float32), nc=nc, nl=len(strides), no=nc + 4 * reg_max, reg_max=reg_max
    )
    param = t.nn.Parameter(t.zeros(1))
    return types.SimpleNamespace(
        hyp={"cls_pw": cls_pw, "fl_gamma": fl_gamma, "label_smoothing": 0.0},
        model=[detect],
        parameters=lambda: iter([param]),
    )


def _configure(assigner, *, topk, alpha, beta):
    assigner.topk, assigner.alpha, assigner.beta = topk, alpha, beta
    return assigner


def make_yolov9_criterion(*, strides=(8, 16, 32), nc=80, reg_max=16, topk=10, alpha=0.5, beta=6.0, cls_pw=1.0,
                          fl_gamma=0.0):
    """An upstream YOLOv9 ``ComputeLoss`` on a fake model (see the module docstring)."""
    loss_tal, _, _ = yolov9_modules()
    crit = loss_tal.ComputeLoss(_fake_model(strides=strides, nc=nc, reg_max=reg_max, cls_pw=cls_pw, fl_gamma=fl_gamma))
    _configure(crit.assigner, topk=topk, alpha=alpha, beta=beta)
    return crit


@contextlib.contextmanager
def _capturing(assigner):
    """Record the assigner's outputs and its ``(B, M, A)`` intermediates.

    Yields a dict filled, as the assigner runs, with the forward outputs
    (:data:`_ASSIGN_OUTPUTS`), ``align_metric``/``overlaps`` as
    ``get_pos_mask`` returns them (before the in-place ``align_metric *=
    mask_pos``) and ``mask_pos``/``target_gt_idx`` from
    ``select_highest_overlaps`` (a module-level function upstream, wrapped for
    the duration).
    """
    _, assigner_mod, _ = yolov9_modules()
    captured = {}
    orig_pos, orig_sel = assigner.get_pos_mask, assigner_mod.select_highest_overlaps

    def get_pos_mask(*args, **kwargs):
        mask_pos, align, overlaps = orig_pos(*args, **kwargs)
        captured.update(align_metric=numpy(align.clone()), overlaps=numpy(overlaps.clone()))
        return mask_pos, align, overlaps

    def select_highest_overlaps(*args, **kwargs):
        target_gt_idx, fg_mask, mask_pos = orig_sel(*args, **kwargs)
        captured.update(target_gt_idx=numpy(target_gt_idx).astype(np.int64), mask_pos=numpy(mask_pos).astype(bool))
        return target_gt_idx, fg_mask, mask_pos

    def hook(_module, _inputs, out):
        captured.update({k: v.clone() for k, v in zip(_ASSIGN_OUTPUTS, out)})

    assigner.get_pos_mask = get_pos_mask
    assigner_mod.select_highest_overlaps = select_highest_overlaps
    handle = assigner.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
        del assigner.get_pos_mask
        assigner_mod.select_highest_overlaps = orig_sel


def _assign_numpy(captured):
    out = {k: numpy(captured[k]) for k in _ASSIGN_OUTPUTS}
    out["fg_mask"] = out["fg_mask"].astype(bool)
    out["target_scores"] = out["target_scores"].astype(np.float32)
    for k in ("align_metric", "overlaps", "mask_pos", "target_gt_idx"):
        if k in captured:  # absent when upstream short-circuits (no GT slot in the batch)
            out[k] = captured[k]
    return out


def yolov9_assign(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, *, nc, topk=10, alpha=0.5,
                  beta=6.0):
    """Upstream ``TaskAlignedAssigner`` on numpy inputs (shapes and units as upstream).

    Args:
      pd_scores: ``(B, A, nc)`` probabilities.
      pd_bboxes: ``(B, A, 4)`` pixels xyxy.
      anc_points: ``(A, 2)`` pixels.
      gt_labels: ``(B, M)`` class ids.
      gt_bboxes: ``(B, M, 4)`` pixels xyxy.
      mask_gt: ``(B, M)`` bool.

    Returns:
      dict of numpy arrays: the forward outputs ``target_labels``,
      ``target_bboxes``, ``target_scores``, ``fg_mask`` and the intermediates
      ``align_metric``, ``overlaps``, ``mask_pos`` ``(B, M, A)`` and
      ``target_gt_idx`` ``(B, A)``.
    """
    _, assigner_mod, _ = yolov9_modules()
    assigner = _configure(assigner_mod.TaskAlignedAssigner(num_classes=nc), topk=topk, alpha=alpha, beta=beta)
    with _capturing(assigner) as captured:
        assigner(
            tensor(pd_scores), tensor(pd_bboxes), tensor(anc_points), tensor(np.asarray(gt_labels)[..., None]),
            tensor(gt_bboxes), tensor(np.asarray(mask_gt)[..., None]),
        )
    return _assign_numpy(captured)


def yolov9_loss(preds_nhwc, targets, *, strides=(8, 16, 32), nc=80, reg_max=16, topk=10, alpha=0.5, beta=6.0,
                cls_pw=1.0, fl_gamma=0.0, cls_loss="bce"):
    """Run upstream YOLOv9 ``ComputeLoss`` forward + backward.

    Args:
      preds_nhwc: per level ``(B, H, W, 4*reg_max + nc)`` arrays.
      targets: a :class:`jaxyolo.Targets` (fed through ``to_rows`` so GT order
        matches) or ``(N, 6)`` rows ``[img, cls, cx, cy, w, h]`` normalised.
      cls_loss: ``"bce"`` (upstream's line) or ``"varifocal"`` (the commented
        "VFL way", see the module docstring).

    Returns:
      dict like :func:`jaxyolo.testing.oracles.ultralytics.v8_detection_loss`:
      ``total`` (``loss.sum() * B``), ``components`` ``(3,)`` box/cls/dfl,
      per-level NHWC ``grads`` and ``assign`` (the assigner outputs in pixels,
      ``target_gt_idx`` and the ``(B, M, A)`` ``align_metric`` / ``overlaps``
      / ``mask_pos``; ``M`` is the per-batch max GT count upstream pads to).
    """
    if cls_loss not in ("bce", "varifocal"):
        raise ValueError(f"cls_loss must be 'bce' or 'varifocal', got {cls_loss!r}")
    t = torch()
    loss_tal, _, _ = yolov9_modules()
    crit = make_yolov9_criterion(strides=strides, nc=nc, reg_max=reg_max, topk=topk, alpha=alpha, beta=beta,
                                 cls_pw=cls_pw, fl_gamma=fl_gamma)
    rows = targets.to_rows() if hasattr(targets, "to_rows") else np.asarray(targets, np.float32).reshape(-1, 6)
    leaves = [nhwc_to_torch(p, grad=True) for p in preds_nhwc]
    with _capturing(crit.assigner) as captured:
        if cls_loss == "varifocal":
            vfl = loss_tal.VarifocalLoss()

            def vfl_way(pred_scores, target_scores):
                label = t.nn.functional.one_hot(captured["target_labels"].long(), nc) * captured["fg_mask"][..., None]
                return vfl(pred_scores, target_scores, label.to(pred_scores.dtype))

            crit.BCEcls = vfl_way
        total, components = crit(leaves, tensor(rows))
    total.backward()
    return {
        "total": float(total.detach()),
        "components": numpy(components).astype(np.float64),
        "grads": [grad_nhwc(x) for x in leaves],
        "assign": _assign_numpy(captured),
    }
