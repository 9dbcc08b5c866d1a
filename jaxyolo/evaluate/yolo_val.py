"""mAP as ``yolo val`` computes it: ultralytics' ``DetectionValidator`` metric in numpy.

pycocotools (:func:`jaxyolo.evaluate.coco_map`) and ultralytics' validator
score the same detections differently, and YOLO users quote the latter.  This
module reproduces ultralytics 8.4.190's rules exactly (the tests compare it
with the real ``DetectionValidator`` to 1e-6), without importing ultralytics:

* **Matching** (``DetectionValidator._process_batch`` /
  ``BaseValidator.match_predictions``): per image, the IoU of every label with
  every detection in the letterboxed frame's pixels (``box_iou``, float32,
  ``eps`` 1e-7 in the union), zeroed across classes; detections visited in
  their NMS order (descending score); at each of the 10 IoU thresholds
  0.50:0.05:0.95 a detection claims the unclaimed label of its class with the
  highest IoU, and is a true positive if that IoU is ``>=`` the threshold.
  pycocotools instead ignores ``iscrowd`` regions, caps 100 detections per
  image and class, and matches at ``>`` thresholds in float64.
* **AP** (``ap_per_class`` / ``compute_ap``): detections of all images sorted
  by score (numpy's default ``argsort`` of ``-conf``, as upstream, so equal
  scores order the same way); per class with labels, precision and recall
  curves; the precision envelope integrated by the trapezoidal rule over 101
  recall points (pycocotools *sums* 101 sampled points / 101).  mAP is the
  mean over the classes that have labels.
* **P and R** as ``yolo val`` prints them: per class, interpolated at the
  confidence (on a 1000-point grid) that maximises the class-mean F1 after a
  box filter of 10 % width (``smooth``).

The detections are what ``DetectionValidator`` feeds it: multi-label NMS
(:func:`jaxyolo.evaluate.batched_nms` with ``multi_label=True``), conf 0.001,
IoU 0.7, ``max_det`` 300 raised to the most labels in one image.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IOU_THRESHOLDS", "ap_per_class", "compute_ap", "format_val_table", "frame_shapes", "match_predictions", "yolo_val_metrics"]

# torch.linspace(0.5, 0.95, 10) in float32 (upstream's ``iouv``), bit for bit.
IOU_THRESHOLDS = np.array([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95], np.float32)
_AP_X = np.linspace(0, 1, 101)
_TRAPZ = getattr(np, "trapezoid", None) or np.trapz


def _box_iou(a, b, eps=1e-7):
    """``(M, 4) x (N, 4)`` xyxy -> ``(M, N)`` IoU, float32 in upstream's operation order."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a1, a2 = a[:, None, :2], a[:, None, 2:]
    b1, b2 = b[None, :, :2], b[None, :, 2:]
    wh = (np.minimum(a2, b2) - np.maximum(a1, b1)).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a2 - a1)[..., 0] * (a2 - a1)[..., 1]
    area_b = (b2 - b1)[..., 0] * (b2 - b1)[..., 1]
    return inter / (area_a + area_b - inter + np.float32(eps))


def match_predictions(pred_classes, true_classes, iou, thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """Which detections of one image are true positives at each IoU threshold.

    Args:
      pred_classes: ``(N,)`` classes of the detections, in descending score.
      true_classes: ``(M,)`` classes of the labels.
      iou: ``(M, N)`` IoU of labels (rows) with detections.
      thresholds: ``(T,)`` IoU thresholds.

    Returns:
      ``(N, T)`` bool: at each threshold, a detection claims the best
      unclaimed label of its class (by IoU) and is correct if that IoU is
      ``>=`` the threshold (upstream's greedy, detection-ordered matching).
    """
    pred_classes, true_classes = np.asarray(pred_classes), np.asarray(true_classes)
    thresholds = np.asarray(thresholds, np.float32)
    correct = np.zeros((pred_classes.shape[0], thresholds.shape[0]), bool)
    iou = np.asarray(iou, np.float32) * (true_classes[:, None] == pred_classes)
    matched = np.zeros((iou.shape[0], len(thresholds)), bool)
    cols = np.arange(len(thresholds))
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(matched, 0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, cols] >= thresholds
        matched[k, cols] |= correct[j]
    return correct


def compute_ap(recall, precision):
    """AP of one precision-recall curve: the precision envelope, interpolated
    at 101 recall points and integrated by the trapezoidal rule.

    Returns:
      ``(ap, mpre, mrec)``: the AP and the envelope's precision and recall
      (with the sentinels upstream adds).
    """
    recall, precision = np.asarray(recall), np.asarray(precision)
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return _TRAPZ(np.interp(_AP_X, mrec, mpre), _AP_X), mpre, mrec


def _smooth(y, f=0.05):
    nf = round(len(y) * f * 2) // 2 + 1
    p = np.ones(nf // 2)
    yp = np.concatenate((p * y[0], y, p * y[-1]), 0)
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")


def ap_per_class(tp, conf, pred_cls, target_cls, *, eps: float = 1e-16) -> dict:
    """AP per class over a dataset (upstream's ``ap_per_class``, without plots).

    Args:
      tp: ``(N, T)`` bool, all images' detections (:func:`match_predictions`).
      conf: ``(N,)`` their scores.
      pred_cls: ``(N,)`` their classes.
      target_cls: ``(L,)`` the classes of all labels.

    Returns:
      dict of numpy arrays over the C classes that have labels:
      ``classes (C,)``, ``ap (C, T)``, ``p``, ``r``, ``f1`` ``(C,)`` at the
      confidence that maximises the smoothed mean F1, ``tp``, ``fp`` ``(C,)``
      (counts there, rounded as upstream).
    """
    tp, conf, pred_cls = np.asarray(tp), np.asarray(conf), np.asarray(pred_cls)
    i = np.argsort(-conf)
    tp, conf, pred_cls = tp[i], conf[i], pred_cls[i]
    unique_classes, nt = np.unique(np.asarray(target_cls), return_counts=True)
    nc = unique_classes.shape[0]
    x = np.linspace(0, 1, 1000)
    ap, p_curve, r_curve = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        n_l, n_p = nt[ci], i.sum()
        if n_p == 0 or n_l == 0:
            continue
        fpc = (1 - tp[i]).cumsum(0)
        tpc = tp[i].cumsum(0)
        recall = tpc / (n_l + eps)
        r_curve[ci] = np.interp(-x, -conf[i], recall[:, 0], left=0)
        precision = tpc / (tpc + fpc)
        p_curve[ci] = np.interp(-x, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j] = compute_ap(recall[:, j], precision[:, j])[0]
    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    k = _smooth(f1_curve.mean(0), 0.1).argmax() if nc else 0
    p, r, f1 = p_curve[:, k], r_curve[:, k], f1_curve[:, k]
    tpk = (r * nt).round()
    fpk = (tpk / (p + eps) - tpk).round()
    return {"classes": unique_classes.astype(int), "ap": ap, "p": p, "r": r, "f1": f1, "tp": tpk, "fp": fpk}


def frame_shapes(img_size, n: int) -> list:
    """``img_size``: S (every frame S x S) or N ``(H, W)`` pairs -> N ``(H, W)``."""
    if np.ndim(img_size) == 0:
        return [(int(img_size), int(img_size))] * n
    shapes = [tuple(int(v) for v in hw) for hw in img_size]
    if len(shapes) != n or any(len(hw) != 2 for hw in shapes):
        raise ValueError(f"img_size must be an int or {n} (H, W) pairs, got {len(shapes)} entries")
    return shapes


def _frame_boxes(labels, hw):
    """``(n, 5) [class, cx, cy, w, h]`` normalised -> classes, ``(n, 4)`` xyxy
    frame pixels in float32 as upstream (``xywh2xyxy(bbox) * imgsz[[1, 0, 1, 0]]``)."""
    lab = np.asarray(labels, np.float32).reshape(-1, 5)
    xy, wh = lab[:, 1:3], lab[:, 3:5]
    half = wh / np.float32(2)
    h, w = hw
    xyxy = np.concatenate([xy - half, xy + half], 1) * np.float32([w, h, w, h])
    return lab[:, 0], xyxy


def yolo_val_metrics(gt_labels, detections, *, img_size: int, nc: int) -> dict:
    """``yolo val``'s box metrics of detections against ground truth.

    Args:
      gt_labels: per image ``(n_i, 5)`` ``[class, cx, cy, w, h]`` normalised
        to its frame.
      detections: per image ``(boxes (D_i, 4) xyxy frame px, scores (D_i,),
        classes (D_i,))`` in descending score (the NMS output).
      img_size: S, the square frames' side in pixels, or per image ``(H, W)``
        (rectangular frames).
      nc: number of classes (ids ``0..nc-1``).

    Returns:
      ``{"map50", "map50_95", "precision", "recall", "images", "instances",
      "per_class"}``: the first four as ``yolo val`` prints on its ``all``
      row; ``per_class`` a list of ``{"class", "images", "instances",
      "precision", "recall", "map50", "map50_95"}`` for the classes with
      labels, in class order.  All 0.0 when there are no labels.
    """
    if len(gt_labels) != len(detections):
        raise ValueError(f"gt_labels has {len(gt_labels)} images but detections has {len(detections)}")
    tps, confs, pcls, tcls, per_image = [], [], [], [], []
    for lab, (b, s, c), hw in zip(gt_labels, detections, frame_shapes(img_size, len(gt_labels))):
        cls, gt = _frame_boxes(lab, hw)
        b = np.asarray(b, np.float32).reshape(-1, 4)
        s, c = np.asarray(s, np.float32).reshape(-1), np.asarray(c).reshape(-1).astype(np.float32)
        if len(cls) and len(c):
            tps.append(match_predictions(c, cls, _box_iou(gt, b)))
        else:
            tps.append(np.zeros((len(c), len(IOU_THRESHOLDS)), bool))
        confs.append(s)
        pcls.append(c)
        tcls.append(cls)
        per_image.append(np.unique(cls))
    target_cls = np.concatenate(tcls) if tcls else np.zeros(0, np.float32)
    res = ap_per_class(np.concatenate(tps) if tps else np.zeros((0, 10), bool), np.concatenate(confs) if confs else np.zeros(0),
                       np.concatenate(pcls) if pcls else np.zeros(0), target_cls)
    nt_class = np.bincount(target_cls.astype(int), minlength=nc)
    nt_image = np.bincount(np.concatenate(per_image).astype(int) if per_image else np.zeros(0, int), minlength=nc)
    ap = res["ap"]
    per_class = [
        {"class": int(c), "images": int(nt_image[c]), "instances": int(nt_class[c]), "precision": float(res["p"][i]),
         "recall": float(res["r"][i]), "map50": float(ap[i, 0]), "map50_95": float(ap[i].mean())}
        for i, c in enumerate(res["classes"])
    ]
    def mean(v):  # upstream's Metric properties: 0.0 without classes
        return float(v.mean()) if v.size else 0.0

    return {
        "map50": mean(ap[:, 0]), "map50_95": mean(ap), "precision": mean(res["p"]), "recall": mean(res["r"]),
        "images": len(gt_labels), "instances": int(nt_class.sum()), "per_class": per_class,
    }


def format_val_table(res: dict, names=None) -> str:
    """``yolo val``'s table: a header, the ``all`` row, one row per class with labels."""
    pf = "%22s" + "%11i" * 2 + "%11.3g" * 4
    lines = [("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)"),
             pf % ("all", res["images"], res["instances"], res["precision"], res["recall"], res["map50"], res["map50_95"])]
    for r in res["per_class"]:
        c = r["class"]
        name = names[c] if names is not None and 0 <= c < len(names) else str(c)
        lines.append(pf % (name, r["images"], r["instances"], r["precision"], r["recall"], r["map50"], r["map50_95"]))
    return "\n".join(lines)
