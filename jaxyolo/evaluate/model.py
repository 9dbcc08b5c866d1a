"""mAP of a model over a dataset: static-shape batches through a jitted predict, pycocotools."""

from __future__ import annotations

from jaxyolo import parallel
from jaxyolo.data.pipeline import eval_batches, to_device
from jaxyolo.evaluate.coco import coco_map

__all__ = ["evaluate_model"]


def evaluate_model(predict, params, stats, data, *, batch_size: int, max_boxes: int, sharding):
    """COCO mAP of ``predict`` on ``data``.

    Args:
      predict: ``predict(params, stats, images (B, S, S, 3) uint8) -> (boxes
        (B, D, 4) xyxy px, scores (B, D), classes (B, D), valid (B, D))``, the
        outputs of :func:`jaxyolo.evaluate.batched_nms` (jitted, batch-sharded).
      params, stats: the model's parameters and BatchNorm statistics.
      data: a :class:`jaxyolo.data.DetectionData` or a streamed
        :class:`jaxyolo.data.stream.StreamedData` (its images decoded as the
        batches go; the unreadable ones left out of the metric).
      batch_size: the static global batch B (the last batch is padded).
      max_boxes: M for the padded labels (unused by the metric; keeps the batch layout).
      sharding: the batch sharding of ``predict``'s images (each process
        feeds its rows; the detections are gathered on every process).

    Returns:
      ``{"map50": float, "map50_95": float}``.
    """
    import jax

    dets = []
    for batch, n in eval_batches(data, batch_size=batch_size, max_boxes=max_boxes, process_index=jax.process_index(), process_count=jax.process_count()):
        images = to_device({"image": batch["image"]}, sharding)["image"]
        b, s, c, v = parallel.fetch(predict(params, stats, images))
        for i in range(n):
            dets.append((b[i][v[i]], s[i][v[i]], c[i][v[i]]))
    labels = list(data.labels)
    failed = getattr(data, "failed", {})  # a streamed split's unreadable images: left out, as load_data leaves them out
    if failed:
        keep = [i for i in range(len(labels)) if i not in failed]
        labels, dets = [labels[i] for i in keep], [dets[i] for i in keep]
    return coco_map(labels, dets, img_size=data.img_size, nc=data.nc)
