"""mAP of a model over a dataset: static-shape batches through a jitted predict,
scored as ``yolo val`` scores them and by pycocotools."""

from __future__ import annotations

from jaxyolo import parallel
from jaxyolo.data.pipeline import eval_batches, to_device
from jaxyolo.evaluate.coco import coco_map
from jaxyolo.evaluate.yolo_val import yolo_val_metrics

__all__ = ["EVAL_PRE_NMS_TOPK", "eval_max_det", "evaluate_model"]

# K of the evaluation NMS: the most (anchor, class) candidates above conf per
# image that enter it (ultralytics: 30 000; the greedy loop costs O(K^2)).
EVAL_PRE_NMS_TOPK = 3000


def eval_max_det(max_det: int, data) -> int:
    """``max_det`` raised to the most labels in one image of ``data``, as
    ``DetectionValidator._check_max_det`` raises its default 300."""
    return max(int(max_det), int(data.max_objects()))


def evaluate_model(predict, params, stats, data, *, batch_size: int, max_boxes: int, sharding, warn=None):
    """mAP of ``predict`` on ``data``, both ways.

    Args:
      predict: ``predict(params, stats, images (B, S, S, 3) uint8) -> (boxes
        (B, D, 4) xyxy px, scores (B, D), classes (B, D), valid (B, D),
        candidates (B,))``, the outputs of :func:`jaxyolo.evaluate.batched_nms`
        with ``multi_label=True, with_count=True`` (jitted, batch-sharded).
      params, stats: the model's parameters and BatchNorm statistics.
      data: a :class:`jaxyolo.data.DetectionData` or a streamed
        :class:`jaxyolo.data.stream.StreamedData` (its images decoded as the
        batches go; the unreadable ones left out of the metric).
      batch_size: the static global batch B (the last batch is padded).
      max_boxes: M for the padded labels (unused by the metric; keeps the batch layout).
      sharding: the batch sharding of ``predict``'s images (each process
        feeds its rows; the detections are gathered on every process).
      warn: ``callable(str)`` for a warning when some image had more NMS
        candidates than the NMS takes (None: no warning).

    Returns:
      ``map50``, ``map50_95``, ``precision``, ``recall``, ``per_class``,
      ``images``, ``instances``: ``yolo val``'s numbers
      (:func:`jaxyolo.evaluate.yolo_val.yolo_val_metrics`);
      ``coco_map50``, ``coco_map50_95``: pycocotools' on the same detections
      (:func:`jaxyolo.evaluate.coco_map`); ``nms_overflow``: images whose
      candidates above the confidence threshold outnumbered the NMS's K
      (their lowest-scoring candidates were dropped).
    """
    import jax

    dets, over, most = [], 0, 0
    for batch, n in eval_batches(data, batch_size=batch_size, max_boxes=max_boxes, process_index=jax.process_index(), process_count=jax.process_count()):
        images = to_device({"image": batch["image"]}, sharding)["image"]
        b, s, c, v, cand = parallel.fetch(predict(params, stats, images))
        for i in range(n):
            dets.append((b[i][v[i]], s[i][v[i]], c[i][v[i]]))
            over += int(cand[i] > EVAL_PRE_NMS_TOPK)
            most = max(most, int(cand[i]))
    labels = list(data.labels)
    failed = getattr(data, "failed", {})  # a streamed split's unreadable images: left out, as load_data leaves them out
    if failed:
        keep = [i for i in range(len(labels)) if i not in failed]
        labels, dets = [labels[i] for i in keep], [dets[i] for i in keep]
    if over and warn is not None:
        warn(f"warning: {over} image{'s' * (over != 1)} had more than {EVAL_PRE_NMS_TOPK} (anchor, class) candidates above the "
             f"confidence threshold (up to {most}); the lowest-scoring were left out of the NMS (ultralytics keeps up to 30 000)")
    res = yolo_val_metrics(labels, dets, img_size=data.img_size, nc=data.nc)
    coco = coco_map(labels, dets, img_size=data.img_size, nc=data.nc)
    return {**res, "coco_map50": coco["map50"], "coco_map50_95": coco["map50_95"], "nms_overflow": over}
