"""Input generators shared by the YOLOX tests (raw head outputs + padded targets)."""

from __future__ import annotations

import numpy as np

from jaxyolo.targets import Targets

STRIDES = (8, 16, 32)
MAX_BOXES = 32


def make_preds(rng, batch, img_hw, nc, *, strides=STRIDES, pred_px=(24.0, 48.0, 96.0)):
    """Raw ``(B, H, W, 5 + nc)`` per level.  Decoded boxes are about ``pred_px``
    pixels wide per level, so IoUs with GTs are substantial and dynamic k > 1."""
    h, w = img_hw
    preds = []
    for s, px in zip(strides, pred_px):
        p = rng.normal(0.0, 1.0, (batch, h // s, w // s, 5 + nc)).astype(np.float32)
        p[..., :2] = rng.uniform(-0.5, 1.5, p[..., :2].shape)
        p[..., 2:4] = np.log(px / s) + rng.normal(0.0, 0.35, p[..., 2:4].shape)
        p[..., 4:] *= 1.5
        preds.append(p.astype(np.float32))
    return preds


def random_box(rng, *, lo=0.03, hi=0.7):
    w, h = rng.uniform(lo, hi, 2)
    return [rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2), w, h]


def make_targets(rng, counts, nc, *, max_boxes=MAX_BOXES, box_fn=None):
    """Targets with ``counts[b]`` random boxes in image ``b``."""
    box_fn = box_fn or (lambda r: random_box(r))
    rows = []
    for b, n in enumerate(counts):
        for _ in range(n):
            rows.append([b, int(rng.integers(nc)), *box_fn(rng)])
    return Targets.from_rows(np.asarray(rows, np.float64).reshape(-1, 6), len(counts), max_boxes)


def clustered_targets(rng, counts, nc, *, max_boxes=MAX_BOXES):
    """Overlapping GTs around a few centres: they compete for the same anchors."""
    rows = []
    for b, n in enumerate(counts):
        centres = rng.uniform(0.3, 0.7, (2, 2))
        for i in range(n):
            cx, cy = centres[i % 2] + rng.normal(0, 0.03, 2)
            w, h = rng.uniform(0.15, 0.45, 2)
            rows.append([b, int(rng.integers(nc)), np.clip(cx, w / 2, 1 - w / 2), np.clip(cy, h / 2, 1 - h / 2), w, h])
    return Targets.from_rows(np.asarray(rows, np.float64).reshape(-1, 6), len(counts), max_boxes)


def tiny_and_huge_targets(rng, counts, nc, img_hw, *, max_boxes=MAX_BOXES):
    """Tiny (1-4 px) boxes, image-sized boxes and ordinary ones mixed."""
    h, w = img_hw
    rows = []
    for b, n in enumerate(counts):
        for i in range(n):
            kind = i % 3
            if kind == 0:  # tiny
                bw, bh = rng.uniform(1.0, 4.0, 2) / np.array([w, h])
                box = [rng.uniform(bw, 1 - bw), rng.uniform(bh, 1 - bh), bw, bh]
            elif kind == 1:  # (nearly) image-sized
                bw, bh = rng.uniform(0.9, 1.0, 2)
                box = [rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2), bw, bh]
            else:
                box = random_box(rng)
            rows.append([b, int(rng.integers(nc)), *box])
    return Targets.from_rows(np.asarray(rows, np.float64).reshape(-1, 6), len(counts), max_boxes)
