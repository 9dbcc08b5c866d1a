"""Static-shape, batched, class-aware non-maximum suppression in JAX, and the
NMS-free top-k selection of end-to-end heads (YOLO26, YOLOv10)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


__all__ = ["batched_nms", "end2end_topk", "select_detections", "nms_reference"]


def _candidates(scores, *, k, multi_label):
    """The top-``k`` (score, anchor, class) candidates of one image, descending.

    Single-label: each anchor votes for its best class (first maximum), as
    upstream's default (``conf, j = cls.max(1)``).  Multi-label (upstream's
    ``multi_label=True``, what ``DetectionValidator`` runs): every (anchor,
    class) pair is a candidate with its own score, so one box can be kept for
    several classes.  Ties in score put the lower flat index first."""
    nc = scores.shape[-1]
    if multi_label:
        top_conf, idx = jax.lax.top_k(scores.reshape(-1), k)
        return top_conf, idx // nc, idx % nc
    top_conf, anchor = jax.lax.top_k(jnp.max(scores, axis=-1), k)
    return top_conf, anchor, jnp.argmax(scores, axis=-1)[anchor]


def _suppression_matrix(boxes, iou_thres):
    """``(K, K)`` bool: ``S[i, j]`` when candidate ``i`` (higher score) would
    suppress ``j > i``: IoU ``> iou_thres``, in upstream ``TorchNMS.nms``'s
    float32 operations (``inter / (area_i + area_j - inter)``, no eps; a 0/0
    IoU of two empty boxes is NaN there, not ``<= thres``, so it suppresses,
    and so it does here).  Coordinates are taken apart first: XLA:CPU ran the
    ``(K, K, 4)`` broadcast 5x slower."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1) * (y2 - y1)
    w = jnp.maximum(jnp.minimum(x2[:, None], x2[None]) - jnp.maximum(x1[:, None], x1[None]), 0.0)
    h = jnp.maximum(jnp.minimum(y2[:, None], y2[None]) - jnp.maximum(y1[:, None], y1[None]), 0.0)
    inter = w * h
    union = area[:, None] + area[None] - inter
    iou = inter / jnp.where(union > 0, union, 1.0)
    k = boxes.shape[0]
    later = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]
    return later & ((union <= 0) | ~(iou <= iou_thres))


def _greedy_keep(suppress, valid):
    """Greedy NMS over candidates in score order: ``keep[j] = valid[j]`` and no
    kept ``i < j`` with ``suppress[i, j]``.

    Computed as the fixed point of ``keep <- valid & ~any_i(keep[i] &
    suppress[i, :])`` from ``keep = valid``: ``keep[j]`` depends only on the
    entries before it, so the fixed point is unique and is the greedy result,
    and after t rounds the first t entries are final.  Suppression chains are
    short (2-5 rounds on a detector's output), so this takes a few ``(K, K)``
    passes where the sequential loop took K dependent steps."""

    def body(state):
        keep, _, n = state
        new = valid & ~jnp.any(suppress & keep[:, None], axis=0)
        return new, jnp.any(new != keep), n + 1

    k = valid.shape[0]
    keep, _, _ = jax.lax.while_loop(lambda st: st[1] & (st[2] <= k), body, (valid, jnp.array(True), jnp.array(0)))
    return keep


def _nms_candidates(boxes, scores, *, conf_thres, k, max_wh, multi_label):
    """One image's top-``k`` candidates in descending score: ``conf (k,)``,
    ``boxes (k, 4)``, ``classes (k,)``, the class-shifted boxes ``(k, 4)``
    the suppression compares, and the number of (anchor, class) pairs (or
    anchors, single-label) with a score ``> conf_thres``."""
    top_conf, anchor, top_cls = _candidates(scores, k=k, multi_label=multi_label)
    top_boxes = boxes[anchor]
    n_cand = (scores > conf_thres).sum() if multi_label else (jnp.max(scores, axis=-1) > conf_thres).sum()
    # Class-aware: offset each class into its own region so classes never overlap
    # (upstream's ``c * max_wh``, same float32 rounding).
    shifted = top_boxes + top_cls.astype(boxes.dtype)[:, None] * max_wh
    return top_conf, top_boxes, top_cls, shifted, n_cand.astype(jnp.int32)


def _nms_select(top_conf, top_boxes, top_cls, shifted, *, conf_thres, iou_thres, max_det):
    """Greedy NMS over one image's candidates (descending score, ``(K,)``
    each): the first ``max_det`` kept, padded to ``max_det``."""
    k = top_conf.shape[0]
    valid = top_conf > conf_thres
    keep = _greedy_keep(_suppression_matrix(shifted, iou_thres), valid)
    # Kept boxes are already in descending score order: take the first max_det.
    n = min(max_det, k)
    order = jnp.argsort(~keep, stable=True)[:n]
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


def _prefix_sizes(k: int) -> tuple[int, ...]:
    """The candidate counts the suppression is compiled for: ``128, 512,
    2048, ...`` below ``k``, then ``k``."""
    sizes, s = [], 128
    while s < k:
        sizes.append(s)
        s *= 4
    return (*sizes, k)


@functools.partial(jax.jit, static_argnames=("conf_thres", "iou_thres", "max_det", "pre_nms_topk", "max_wh", "multi_label", "with_count"))
def batched_nms(boxes, scores, *, conf_thres=0.001, iou_thres=0.7, max_det=100, pre_nms_topk=1000, max_wh=7680.0,
                multi_label=False, with_count=False):
    """Class-aware greedy NMS for a batch, with static output shapes.

    Args:
      boxes: ``(B, A, 4)`` xyxy boxes in pixels.
      scores: ``(B, A, nc)`` class scores in ``[0, 1]``.
      conf_thres: a candidate needs a score ``> conf_thres``.
      iou_thres: a candidate is suppressed by a higher-scoring kept box of the
        same class with IoU ``> iou_thres``.
      max_det: D, detections kept per image.
      pre_nms_topk: K, only the top-K candidates by score enter NMS (the
        static size; upstream's ``max_nms`` is 30 000).  Candidates beyond K
        are dropped, the lowest-scoring ones; ``with_count`` tells when.  The
        ``(K, K)`` suppression runs on the first 128, 512, 2048, ... or K of
        them, the shortest that holds every candidate above ``conf_thres``
        in the batch (one program, a ``lax.switch``; the same result).
      max_wh: class offset in pixels (boxes must be smaller than this).
      multi_label: False: each anchor is one candidate, its best class
        (upstream's predict).  True: each (anchor, class) pair with a score
        ``> conf_thres`` is a candidate (upstream's ``multi_label=True``, what
        ``yolo val`` runs; upstream turns it off when ``nc == 1``, where the
        two are the same).
      with_count: also return ``(B,) int32`` the number of candidates above
        ``conf_thres`` per image (more than K: some were dropped).

    Ties in score keep the lower anchor index first (then the lower class).

    Returns:
      ``boxes (B, D, 4)``, ``scores (B, D)``, ``classes (B, D) int32``,
      ``valid (B, D) bool``; detections in descending score, padding after;
      with ``with_count``, then the candidate counts.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, A, 4), got {tuple(boxes.shape)}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"scores must be (B, A, nc) with (B, A) = {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}")
    for name, v in (("max_det", max_det), ("pre_nms_topk", pre_nms_topk)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    multi_label = bool(multi_label) and scores.shape[-1] > 1
    k = min(pre_nms_topk, scores.shape[1] * (scores.shape[2] if multi_label else 1))
    cands = jax.vmap(functools.partial(_nms_candidates, conf_thres=conf_thres, k=k, max_wh=max_wh, multi_label=multi_label))(
        boxes.astype(jnp.float32), scores.astype(jnp.float32))
    *cands, count = cands
    # The (K, K) suppression is the cost, and on a trained detector most of the
    # K candidates are below conf_thres (invalid: they neither are kept nor
    # suppress).  The candidates are in descending score, so the first
    # ``max(count)`` of them hold every valid one: run the suppression on the
    # shortest compiled prefix that covers them (same result, 16x less work
    # for 500 of 2000).
    sizes = _prefix_sizes(k)
    need = jnp.minimum(jnp.max(count, initial=0), k)
    select = functools.partial(_nms_select, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
    branches = [lambda c, s=s: jax.vmap(select)(*(v[:, :s] for v in c)) for s in sizes]
    out = jax.lax.switch(jnp.searchsorted(jnp.asarray(sizes, jnp.int32), need), branches, cands)
    return (*out, count) if with_count else tuple(out)


def end2end_topk(boxes, scores, *, conf_thres=0.0, max_det=300, with_count=False):
    """The detections of an end-to-end (one-to-one) head, without NMS:
    ultralytics 8.4.190 ``Detect.postprocess`` (``get_topk_index``, not
    class-agnostic) then ``non_max_suppression(end2end=True)``'s threshold.

    With ``k = min(max_det, A)``: the ``k`` anchors of highest best-class
    score; among their ``k x nc`` (anchor, class) scores the ``k`` highest,
    each a detection of that class (an anchor can give several classes);
    kept when its score ``> conf_thres``.  Ties take the lower index first
    (``jax.lax.top_k``; torch's order among equal scores is unspecified).

    Args:
      boxes: ``(B, A, 4)`` xyxy boxes in pixels (the one-to-one branch).
      scores: ``(B, A, nc)`` class scores in ``[0, 1]``.
      conf_thres: a detection needs a score ``> conf_thres``.
      max_det: D, detections per image (upstream's ``max_det``, 300).
      with_count: also return ``(B,) int32`` the kept detections per image.

    Returns:
      as :func:`batched_nms`: ``boxes (B, D, 4)``, ``scores (B, D)``,
      ``classes (B, D) int32``, ``valid (B, D) bool``, descending score,
      padded (zeros, invalid) where ``A < D``.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, A, 4), got {tuple(boxes.shape)}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"scores must be (B, A, nc) with (B, A) = {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}")
    if not isinstance(max_det, int) or isinstance(max_det, bool) or max_det < 1:
        raise ValueError(f"max_det must be a positive int, got {max_det!r}")
    boxes, scores = boxes.astype(jnp.float32), scores.astype(jnp.float32)
    b, a, nc = scores.shape
    k = min(max_det, a)
    _, anchor = jax.lax.top_k(scores.max(-1), k)  # (B, k)
    cand = jnp.take_along_axis(scores, anchor[..., None], axis=1).reshape(b, k * nc)
    top, flat = jax.lax.top_k(cand, k)
    anchor = jnp.take_along_axis(anchor, flat // nc, axis=1)
    out_boxes = jnp.take_along_axis(boxes, anchor[..., None], axis=1)
    classes = (flat % nc).astype(jnp.int32)
    valid = top > conf_thres
    pad = max_det - k
    if pad:
        out_boxes = jnp.pad(out_boxes, ((0, 0), (0, pad), (0, 0)))
        top, classes, valid = (jnp.pad(v, ((0, 0), (0, pad))) for v in (top, classes, valid))
    out = (out_boxes, jnp.where(valid, top, 0.0), jnp.where(valid, classes, 0), valid)
    return (*out, valid.sum(-1, dtype=jnp.int32)) if with_count else out


def select_detections(boxes, scores, *, end2end: bool, conf_thres, iou_thres, max_det, multi_label=False,
                      pre_nms_topk=1000, with_count=False):
    """:func:`end2end_topk` for an end-to-end model's one-to-one predictions
    (``end2end=True``; ``iou_thres``, ``multi_label`` and ``pre_nms_topk`` do
    not apply), :func:`batched_nms` otherwise; the same outputs."""
    if end2end:
        return end2end_topk(boxes, scores, conf_thres=conf_thres, max_det=max_det, with_count=with_count)
    return batched_nms(boxes, scores, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, multi_label=multi_label,
                       pre_nms_topk=pre_nms_topk, with_count=with_count)


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
