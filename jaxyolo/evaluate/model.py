"""mAP of a model over a dataset: static-shape batches through a jitted predict,
scored as ``yolo val`` scores them and by pycocotools.

Two framings of the val images:

* **square** (``rect=False``; the trainer's periodic evaluation, as
  ultralytics' trainer validates): every image in its S x S letterboxed frame;
* **rectangular batches** (``rect=True``; ``jaxyolo eval``, as ``yolo val``,
  whose ``Model.val`` sets ``rect=True``): ultralytics'
  ``BaseDataset.set_rectangle`` sorts the images by aspect ratio, cuts them
  into batches, and gives each batch the frame ``ceil(shape * S / stride +
  0.5) * stride`` (``pad`` 0.5 for val): each image, resized as for the
  square frame (long side S), is centred in its batch's frame by ``LetterBox``
  (no rescale).  A square image at S = 128 gets a 160 x 160 frame: 16 px of
  grey on each side, which moves the objects half a stride-32 cell against
  the square framing and changes the detections (mAP50-95 0.377 square vs
  0.370 rectangular on one model of ``experiments/compare_trainers.py``).
  One compile per distinct frame shape.
"""

from __future__ import annotations

import numpy as np

from jaxyolo import parallel
from jaxyolo.data.decode import PAD_VALUE
from jaxyolo.data.pipeline import _Source, eval_batches, to_device
from jaxyolo.evaluate.coco import coco_map
from jaxyolo.evaluate.yolo_val import yolo_val_metrics

__all__ = ["EVAL_PRE_NMS_TOPK", "eval_max_det", "evaluate_model", "rect_batch_shapes"]

# K of the evaluation NMS: the most (anchor, class) candidates above conf per
# image that enter it (ultralytics: 30 000; the NMS holds a K x K suppression matrix).
EVAL_PRE_NMS_TOPK = 3000


def eval_max_det(max_det: int, data) -> int:
    """``max_det`` raised to the most labels in one image of ``data``, as
    ``DetectionValidator._check_max_det`` raises its default 300."""
    return max(int(max_det), int(data.max_objects()))


def rect_batch_shapes(shapes, *, batch_size: int, img_size: int, stride: int = 32, pad: float = 0.5):
    """ultralytics' ``BaseDataset.set_rectangle``.

    Args:
      shapes: ``(N, 2)`` ``[h, w]`` of the original images (after EXIF).
      batch_size: images per batch.
      img_size: S.
      stride: the model's largest stride.
      pad: 0.5 for val (``build_yolo_dataset``), 0 for training.

    Returns:
      ``order (N,)``: the images by ascending aspect ratio ``h / w`` (numpy's
      default sort, as upstream), and ``frames (nb, 2) int [H, W]``: batch
      ``i`` holds ``order[i * batch_size : (i + 1) * batch_size]``.
    """
    s = np.asarray(shapes).reshape(-1, 2)
    if not len(s):
        return np.zeros(0, int), np.zeros((0, 2), int)
    bi = np.floor(np.arange(len(s)) / batch_size).astype(int)
    ar = s[:, 0] / s[:, 1]
    order = ar.argsort()
    ar = ar[order]
    rel = [[1, 1]] * (bi[-1] + 1)
    for i in range(len(rel)):
        ari = ar[bi == i]
        mini, maxi = ari.min(), ari.max()
        if maxi < 1:
            rel[i] = [maxi, 1]
        elif mini > 1:
            rel[i] = [1, 1 / mini]
    return order, np.ceil(np.array(rel) * img_size / stride + pad).astype(int) * stride


def _original_shapes(data) -> np.ndarray:
    """``(N, 2)`` ``[h, w]`` of the files behind ``data`` (S x S for rendered images)."""
    from jaxyolo.data.stream import StreamedData

    if isinstance(data, StreamedData):
        from jaxyolo.data.decode import image_size

        s = data.img_size
        out = []
        for f in data.files:
            try:
                out.append(image_size(f))
            except Exception:  # unreadable: left out of the metric anyway
                out.append((s, s))
        return np.asarray(out, np.int64)
    if getattr(data, "orig_shapes", None) is not None:
        return np.asarray(data.orig_shapes, np.int64)
    return np.full((len(data), 2), data.img_size, np.int64)


def _reframe(frames, rects, height: int, width: int):
    """Square letterboxed frames -> ``(B, H, W, 3)`` frames of ``LetterBox(rect_shape=(H, W),
    scaleup=False, center=True)``; returns them and each image's ``(top, left)`` there."""
    out = np.full((len(frames), height, width, 3), PAD_VALUE, np.uint8)
    offsets = np.zeros((len(frames), 2), np.int64)
    for i, (im, (top, left, h, w)) in enumerate(zip(frames, rects)):
        t2, l2 = round((height - h) / 2 - 0.1), round((width - w) / 2 - 0.1)
        out[i, t2 : t2 + h, l2 : l2 + w] = im[top : top + h, left : left + w]
        offsets[i] = t2, l2
    return out, offsets


def _rect_batches(data, *, batch_size, max_boxes, stride):
    """Yield ``(images (B, H, W, 3), idx (n,), labels [(n_i, 5)], frame (H, W), n)`` in
    ``set_rectangle``'s order (one process); labels normalised to the batch's frame.
    The last batch is padded with copies of its first image."""
    order, frames = rect_batch_shapes(_original_shapes(data), batch_size=batch_size, img_size=data.img_size, stride=stride)
    source, size = _Source(data, max_boxes), data.img_size
    for j, (height, width) in enumerate(frames):
        idx = order[j * batch_size : (j + 1) * batch_size]
        n = len(idx)
        b = source.collect(source.request(np.concatenate([idx, np.full(batch_size - n, idx[0])])))
        images, offsets = _reframe(b["image"], b["rects"], int(height), int(width))
        labels = []
        for i in range(n):
            m = b["mask"][i]
            box = b["boxes"][i][m] * size  # cxcywh px of the square frame
            top, left = b["rects"][i][:2]
            box[:, 0] += offsets[i, 1] - left
            box[:, 1] += offsets[i, 0] - top
            box /= np.float32([width, height, width, height])
            labels.append(np.concatenate([b["classes"][i][m][:, None].astype(np.float32), box], 1))
        yield images, idx, labels, (int(height), int(width)), n


def evaluate_model(predict, params, stats, data, *, batch_size: int, max_boxes: int, sharding, warn=None, rect: bool = False, stride: int = 32,
                   coco: bool = True):
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
      rect: rectangular batches as ``yolo val`` (see the module docstring);
        False: the square S x S frames.  Only on one process.
      stride: the model's largest stride (the frames' multiple with ``rect``).
      coco: also pycocotools' COCO mAP (pure Python, 3-4 s for 400 images
        on a 2-core CPU, as long as the rest of a small evaluation); False:
        ``coco_map50`` and ``coco_map50_95`` are None.

    Returns:
      ``map50``, ``map50_95``, ``precision``, ``recall``, ``per_class``,
      ``images``, ``instances``: ``yolo val``'s numbers
      (:func:`jaxyolo.evaluate.yolo_val.yolo_val_metrics`);
      ``coco_map50``, ``coco_map50_95``: pycocotools' on the same detections
      (:func:`jaxyolo.evaluate.coco_map`; None with ``coco=False``); ``nms_overflow``: images whose
      candidates above the confidence threshold outnumbered the NMS's K
      (their lowest-scoring candidates were dropped).
    """
    import jax

    dets, over, most = [], 0, 0
    pi, pc = jax.process_index(), jax.process_count()
    if rect and pc > 1:
        raise ValueError(f"rect=True evaluates on one process, not {pc}")

    def run(images, n):
        nonlocal over, most
        b, s, c, v, cand = parallel.fetch(predict(params, stats, to_device({"image": images}, sharding)["image"]))
        for i in range(n):
            dets.append((b[i][v[i]], s[i][v[i]], c[i][v[i]]))
            over += int(cand[i] > EVAL_PRE_NMS_TOPK)
            most = max(most, int(cand[i]))

    if rect:
        order, labels, shapes = [], [], []
        for images, idx, lab, frame, n in _rect_batches(data, batch_size=batch_size, max_boxes=max_boxes, stride=stride):
            run(images, n)
            order += idx.tolist()
            labels += lab
            shapes += [frame] * n
    else:
        for batch, n in eval_batches(data, batch_size=batch_size, max_boxes=max_boxes, process_index=pi, process_count=pc):
            run(batch["image"], n)
        order, labels, shapes = list(range(len(data))), list(data.labels), [(data.img_size, data.img_size)] * len(data)
    failed = getattr(data, "failed", {})  # a streamed split's unreadable images: left out, as load_data leaves them out
    if failed:
        keep = [k for k, i in enumerate(order) if i not in failed]
        labels, dets, shapes = [labels[k] for k in keep], [dets[k] for k in keep], [shapes[k] for k in keep]
    if over and warn is not None:
        warn(f"warning: {over} image{'s' * (over != 1)} had more than {EVAL_PRE_NMS_TOPK} (anchor, class) candidates above the "
             f"confidence threshold (up to {most}); the lowest-scoring were left out of the NMS (ultralytics keeps up to 30 000)")
    res = yolo_val_metrics(labels, dets, img_size=shapes, nc=data.nc)
    c = coco_map(labels, dets, img_size=shapes, nc=data.nc) if coco else {"map50": None, "map50_95": None}
    return {**res, "coco_map50": c["map50"], "coco_map50_95": c["map50_95"], "nms_overflow": over}
