"""Static-shape, batched, class-aware non-maximum suppression in JAX."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.boxes import box_iou_matrix

__all__ = ["batched_nms", "nms_reference"]


def _nms_one(boxes, scores, *, conf_thres, iou_thres, max_det, pre_nms_topk, max_wh):
    # Best class per anchor (single-label, as ultralytics' default).
    cls = jnp.argmax(scores, axis=-1)
    conf = jnp.max(scores, axis=-1)
    k = min(pre_nms_topk, conf.shape[0])
    top_conf, idx = jax.lax.top_k(conf, k)  # sorted descending, ties by lower index
    top_boxes, top_cls = boxes[idx], cls[idx]
    valid = top_conf > conf_thres
    # Class-aware: offset each class into its own region so classes never overlap.
    offset = top_cls.astype(boxes.dtype)[:, None] * max_wh
    iou = box_iou_matrix(top_boxes + offset, top_boxes + offset)
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]
    suppress = (iou > iou_thres) & later

    def body(i, keep):
        return keep & ~(suppress[i] & keep[i])

    keep = jax.lax.fori_loop(0, k, body, valid)
    # Kept boxes are already in descending score order: take the first max_det.
    order = jnp.argsort(~keep, stable=True)[:max_det]
    n = min(max_det, k)
    order = order[:n]
    out_valid = keep[order]
    pad = max_det - n
    out_boxes = jnp.where(out_valid[:, None], top_boxes[order], 0.0)
    out_scores = jnp.where(out_valid, top_conf[order], 0.0)
    out_cls = jnp.where(out_valid, top_cls[order], 0)
    if pad:
        out_boxes = jnp.pad(out_boxes, ((0, pad), (0, 0)))
        out_scores = jnp.pad(out_scores, (0, pad))
        out_cls = jnp.pad(out_cls, (0, pad))
        out_valid = jnp.pad(out_valid, (0, pad))
    return out_boxes, out_scores, out_cls.astype(jnp.int32), out_valid


@functools.partial(jax.jit, static_argnames=("conf_thres", "iou_thres", "max_det", "pre_nms_topk", "max_wh"))
def batched_nms(boxes, scores, *, conf_thres=0.001, iou_thres=0.7, max_det=100, pre_nms_topk=1000, max_wh=7680.0):
    """Class-aware greedy NMS for a batch, with static output shapes.

    Args:
      boxes: ``(B, A, 4)`` xyxy boxes in pixels.
      scores: ``(B, A, nc)`` class scores in ``[0, 1]``.
      conf_thres: a box is a candidate only if its best class score is ``> conf_thres``.
      iou_thres: a candidate is suppressed by a higher-scoring kept box of the
        same class with IoU ``> iou_thres``.
      max_det: D, detections kept per image.
      pre_nms_topk: only the top-k candidates by score enter NMS (static size).
      max_wh: class offset in pixels (boxes must be smaller than this).

    Each anchor votes for its best class only (single-label).  Ties in score
    keep the lower anchor index first.

    Returns:
      ``boxes (B, D, 4)``, ``scores (B, D)``, ``classes (B, D) int32``,
      ``valid (B, D) bool``; detections in descending score, padding after.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, A, 4), got {tuple(boxes.shape)}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"scores must be (B, A, nc) with (B, A) = {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}")
    fn = functools.partial(
        _nms_one, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, pre_nms_topk=pre_nms_topk, max_wh=max_wh
    )
    return jax.vmap(fn)(boxes.astype(jnp.float32), scores.astype(jnp.float32))


def nms_reference(boxes, scores, *, conf_thres=0.001, iou_thres=0.7, max_det=100):
    """A straightforward numpy greedy NMS for one image (the test reference).

    ``boxes (A, 4)``, ``scores (A, nc)`` -> list of ``(box, score, class)``
    sorted by descending score, at most ``max_det``.  Per class, repeatedly
    keep the best remaining box and drop same-class boxes with IoU > thres.
    """
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    cls = scores.argmax(-1)
    conf = scores.max(-1)
    cand = np.flatnonzero(conf > conf_thres)
    kept = []
    for c in np.unique(cls[cand]):
        idx = [i for i in cand if cls[i] == c]
        idx.sort(key=lambda i: (-conf[i], i))
        while idx:
            i = idx.pop(0)
            kept.append(i)
            rest = []
            for j in idx:
                a, b = boxes[i], boxes[j]
                iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
                ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
                inter = iw * ih
                union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
                if inter / (union + 1e-7) <= iou_thres:
                    rest.append(j)
            idx = rest
    kept.sort(key=lambda i: (-conf[i], i))
    return [(boxes[i], conf[i], int(cls[i])) for i in kept[:max_det]]
