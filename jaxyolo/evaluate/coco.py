"""COCO mAP@0.5:0.95 and mAP@0.5 with pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from jaxyolo.evaluate.yolo_val import frame_shapes

__all__ = ["coco_map"]


def coco_map(gt_labels, detections, *, img_size: int, nc: int):
    """COCO box mAP of detections against ground truth, via pycocotools.

    Args:
      gt_labels: per image ``(n_i, 5)`` ``[class, cx, cy, w, h]`` normalised.
      detections: per image ``(boxes (D_i, 4) xyxy px, scores (D_i,), classes (D_i,))``.
      img_size: S, the square frames' side in pixels, or per image ``(H, W)``.
      nc: number of classes (category ids ``0..nc-1``).

    Returns:
      ``{"map50_95": float, "map50": float}``; 0.0 when there are no
      detections.  Images without ground truth still count (their
      detections are false positives).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(gt_labels) != len(detections):
        raise ValueError(f"gt_labels has {len(gt_labels)} images but detections has {len(detections)}")
    shapes = frame_shapes(img_size, len(gt_labels))
    images = [{"id": i + 1, "width": fw, "height": fh} for i, (fh, fw) in enumerate(shapes)]
    anns = []
    for i, (lab, (fh, fw)) in enumerate(zip(gt_labels, shapes)):
        for c, cx, cy, w, h in np.asarray(lab, np.float64).reshape(-1, 5):
            bw, bh = w * fw, h * fh
            anns.append({
                "id": len(anns) + 1, "image_id": i + 1, "category_id": int(c), "iscrowd": 0,
                "bbox": [(cx - w / 2) * fw, (cy - h / 2) * fh, bw, bh], "area": bw * bh,
            })
    dets = []
    for i, (b, s, c) in enumerate(detections):
        b = np.asarray(b, np.float64).reshape(-1, 4)
        for box, score, cls in zip(b, np.asarray(s).reshape(-1), np.asarray(c).reshape(-1)):
            dets.append({"image_id": i + 1, "category_id": int(cls), "score": float(score),
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    if not dets or not anns:
        return {"map50_95": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k} for k in range(nc)]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map50_95": float(max(ev.stats[0], 0.0)), "map50": float(max(ev.stats[1], 0.0))}
