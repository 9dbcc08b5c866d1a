"""ultralytics 8.4.190 ``v8DetectionLoss`` called on channels-last inputs.

The loss is constructed on a minimal fake model exposing exactly what
``v8DetectionLoss.__init__`` reads: ``parameters()`` (for the device),
``args`` (``box``, ``cls``, ``dfl`` gains), ``model[-1]`` (Detect: ``stride``,
``nc``, ``reg_max``) and optionally ``class_weights``.  Predictions are fed as
upstream's training dict ``{"boxes": (B, 4*reg_max, A), "scores": (B, nc, A),
"feats": [per-level NCHW]}`` built from per-level NCHW leaves, so the
gradients come back per level.  Targets go in as the ``batch`` dict
(``batch_idx``, ``cls``, ``bboxes`` normalised cxcywh) from ``Targets.to_rows``.
"""

from __future__ import annotations

import sys
import types

import numpy as np

from jaxyolo.testing.oracles._torch import _import, grad_nhwc, nhwc_to_torch, numpy, tensor, torch, ultralytics_modules

__all__ = ["make_v8_criterion", "ultralytics_nms", "ultralytics_val_metrics", "v8_detection_loss"]


def _fake_model(*, strides, nc, reg_max, box, cls, dfl, class_weights):
    t = torch()
    detect = types.SimpleNamespace(stride=t.tensor(strides, dtype=t.float32), nc=nc, reg_max=reg_max)
    param = t.nn.Parameter(t.zeros(1))
    model = types.SimpleNamespace(
        args=types.SimpleNamespace(box=box, cls=cls, dfl=dfl),
        model=[detect],
        parameters=lambda: iter([param]),
    )
    if class_weights is not None:
        model.class_weights = t.tensor(np.asarray(class_weights, np.float32))
    return model


def make_v8_criterion(*, strides=(8, 16, 32), nc=80, reg_max=16, box=7.5, cls=0.5, dfl=1.5, topk=10, topk2=None,
                      class_weights=None):
    """An upstream ``v8DetectionLoss`` on a fake model (see the module docstring)."""
    loss_mod, _, _ = ultralytics_modules()
    model = _fake_model(strides=strides, nc=nc, reg_max=reg_max, box=box, cls=cls, dfl=dfl, class_weights=class_weights)
    return loss_mod.v8DetectionLoss(model, tal_topk=topk, tal_topk2=topk2)


def v8_detection_loss(preds_nhwc, targets, *, strides=(8, 16, 32), nc=80, reg_max=16, box=7.5, cls=0.5, dfl=1.5,
                      topk=10, topk2=None, class_weights=None):
    """Run upstream ``v8DetectionLoss`` forward + backward.

    Args:
      preds_nhwc: per level ``(B, H, W, 4*reg_max + nc)`` arrays.
      targets: a :class:`jaxyolo.Targets` (fed through ``to_rows`` so GT order
        matches) or ``(N, 6)`` rows ``[img, cls, cx, cy, w, h]``.

    Returns:
      dict: ``total`` (float, ``(loss * B).sum()``), ``components`` ``(3,)``
      box/cls/dfl (upstream ``loss.detach()``), ``grads`` per level NHWC,
      ``assign``: the assigner outputs ``target_labels, target_bboxes (px),
      target_scores, fg_mask, target_gt_idx`` (``(B, A, ...)``; ``M`` = the
      per-batch max GT count upstream pads to) and ``align_metric`` /
      ``overlaps`` / ``mask_pos`` ``(B, M, A)`` from ``get_pos_mask`` /
      ``select_highest_overlaps``.
    """
    t = torch()
    crit = make_v8_criterion(strides=strides, nc=nc, reg_max=reg_max, box=box, cls=cls, dfl=dfl, topk=topk,
                             topk2=topk2, class_weights=class_weights)
    rows = targets.to_rows() if hasattr(targets, "to_rows") else np.asarray(targets, np.float32).reshape(-1, 6)
    leaves = [nhwc_to_torch(p, grad=True) for p in preds_nhwc]
    b, no = leaves[0].shape[:2]
    cat = t.cat([x.view(b, no, -1) for x in leaves], 2)
    preds = {"boxes": cat[:, : 4 * reg_max], "scores": cat[:, 4 * reg_max :], "feats": leaves}
    batch = {
        "batch_idx": tensor(rows[:, 0]),
        "cls": tensor(rows[:, 1:2]),
        "bboxes": tensor(rows[:, 2:6]),
    }

    captured = {}
    assigner = crit.assigner
    orig_pos, orig_sel = assigner.get_pos_mask, assigner.select_highest_overlaps

    def get_pos_mask(*args, **kwargs):
        mask_pos, align, overlaps = orig_pos(*args, **kwargs)
        captured["align_metric"] = numpy(align.clone())
        captured["overlaps"] = numpy(overlaps.clone())
        return mask_pos, align, overlaps

    def select_highest_overlaps(*args, **kwargs):
        out = orig_sel(*args, **kwargs)
        captured["mask_pos"] = numpy(out[2].clone()).astype(bool)
        return out

    assigner.get_pos_mask = get_pos_mask
    assigner.select_highest_overlaps = select_highest_overlaps
    names = ("target_labels", "target_bboxes", "target_scores", "fg_mask", "target_gt_idx")
    hook = assigner.register_forward_hook(
        lambda _m, _i, out: captured.update({k: numpy(v.clone()) for k, v in zip(names, out)})
    )
    try:
        loss, loss_items = crit(preds, batch)
    finally:
        hook.remove()
    total = loss.sum()
    total.backward()
    assign = {k: captured[k] for k in names if k in captured}
    for k in ("align_metric", "overlaps", "mask_pos"):
        if k in captured:
            assign[k] = captured[k]
    if "fg_mask" in assign:
        assign["fg_mask"] = assign["fg_mask"].astype(bool)
        assign["target_gt_idx"] = assign["target_gt_idx"].astype(np.int64)
    return {
        "total": float(total.detach()),
        "components": numpy(loss_items).astype(np.float64) if hasattr(loss_items, "detach") else np.array(
            [float(v) for v in loss_items.values()]
        ),
        "grads": [grad_nhwc(x) for x in leaves],
        "assign": assign,
    }


def ultralytics_nms(boxes, scores, *, conf_thres, iou_thres, max_det, max_wh=7680, multi_label=False):
    """ultralytics 8.4.190 ``utils.nms.non_max_suppression`` (class-aware; best
    class per box, or every class above ``conf_thres`` with ``multi_label``).

    Upstream runs ``torchvision.ops.nms`` when a module named ``torchvision`` is
    imported and its own ``TorchNMS.nms`` ("matches torchvision behavior
    exactly") otherwise; torchvision's compiled op is CUDA-only on PyPI, so the
    harness' stand-in is hidden for the call and upstream takes ``TorchNMS``.

    Args:
      boxes: ``(B, A, 4)`` xyxy pixels (fed to upstream as cxcywh, its input format).
      scores: ``(B, A, nc)`` class scores in ``[0, 1]``.

    Returns:
      per image, an ``(n, 6)`` numpy array ``[x1, y1, x2, y2, score, class]`` in
      upstream's output order (descending score).
    """
    t = torch()
    nms = _import("ultralytics.utils.nms")
    b = np.asarray(boxes, np.float32)
    xywh = np.concatenate([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)
    pred = np.concatenate([xywh, np.asarray(scores, np.float32)], -1).transpose(0, 2, 1)  # (B, 4 + nc, A)
    pred = t.from_numpy(np.ascontiguousarray(pred))
    shim = sys.modules.pop("torchvision")
    try:
        out = nms.non_max_suppression(pred, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, max_wh=max_wh,
                                      multi_label=multi_label)
    finally:
        sys.modules["torchvision"] = shim
    return [numpy(o) for o in out]


def ultralytics_val_metrics(gt_labels, detections, *, img_size, nc, save_dir):
    """ultralytics 8.4.190 ``DetectionValidator``'s metrics of given detections.

    A real ``DetectionValidator`` (plots and JSON off) is fed one image per
    ``update_metrics`` call, in the layout its dataloader and ``postprocess``
    give it: labels as normalised cxcywh of the S x S frame, detections as
    frame-pixel xyxy in descending score.  Then ``get_stats``.

    Args:
      gt_labels: per image ``(n_i, 5) [class, cx, cy, w, h]`` normalised.
      detections: per image ``(boxes (D_i, 4) xyxy px, scores (D_i,), classes (D_i,))``.
      img_size: S.
      nc: number of classes.
      save_dir: a folder the validator may create.

    Returns:
      ``{"results": get_stats() dict, "mean": [P, R, mAP50, mAP50-95],
      "classes": ap_class_index, "class_results": [(P, R, AP50, AP) per class],
      "nt_per_class", "nt_per_image", "seen"}``.
    """
    t = torch()
    val = _import("ultralytics.models.yolo.detect.val")
    metrics = _import("ultralytics.utils.metrics")
    v = val.DetectionValidator(save_dir=save_dir, args={"plots": False, "save_json": False, "imgsz": img_size})
    names = {i: str(i) for i in range(nc)}
    v.device = t.device("cpu")
    v.names, v.nc, v.seen, v.jdict = names, nc, 0, []
    v.is_custom_json, v.build_gdict, v.eval_ids, v.pred_counts = False, False, None, []
    v.metrics.names = names
    v.metrics.clear_stats()
    v.metrics.clear_image_metrics()
    v.confusion_matrix = metrics.ConfusionMatrix(names=names)
    for i, (lab, (b, s, c)) in enumerate(zip(gt_labels, detections)):
        lab = np.asarray(lab, np.float32).reshape(-1, 5)
        batch = {
            "img": t.zeros((1, 3, img_size, img_size)),
            "batch_idx": t.zeros(len(lab)),
            "cls": t.from_numpy(lab[:, :1].copy()),
            "bboxes": t.from_numpy(lab[:, 1:].copy()),
            "ori_shape": [(img_size, img_size)],
            "ratio_pad": [((1.0, 1.0), (0.0, 0.0))],
            "im_file": [f"{i}.jpg"],
        }
        pred = {
            "bboxes": t.from_numpy(np.asarray(b, np.float32).reshape(-1, 4).copy()),
            "conf": t.from_numpy(np.asarray(s, np.float32).reshape(-1).copy()),
            "cls": t.from_numpy(np.asarray(c, np.float32).reshape(-1).copy()),
        }
        pred["extra"] = t.zeros((len(pred["conf"]), 0))
        v.update_metrics([pred], batch)
    results = v.get_stats()
    m = v.metrics
    return {
        "results": results, "mean": [float(x) for x in m.mean_results()], "classes": [int(c) for c in m.ap_class_index],
        "class_results": [tuple(float(x) for x in m.class_result(i)) for i in range(len(m.ap_class_index))],
        "nt_per_class": m.nt_per_class, "nt_per_image": m.nt_per_image, "seen": v.seen,
    }
