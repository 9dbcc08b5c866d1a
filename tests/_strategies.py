"""Hypothesis strategies for ground-truth boxes, shared by the parity and property tests.

Boxes are drawn by hypothesis (not built by numpy from a drawn seed), so a failing
case shrinks to a few small boxes, and the draws aim at the edges the assigners
test strictly:

* every corner is a whole pixel of a power-of-two image, so every coordinate is
  exact in float32, normalised or in pixels, and survives cxcywh <-> xyxy;
* corners are often anchor centres ``(i + 0.5) * stride``: a GT edge exactly on an
  anchor centre is where TAL's in-box test ``delta > eps`` and YOLOX's in-box test
  ``delta > 0`` decide;
* centres are often multiples of 4 px: at multiples of a stride YOLOX's centre
  region (``2.5`` strides around the GT centre) ends exactly on anchor centres,
  and YOLOv5's ``build_targets`` sees centres on cell borders and half-cells;
* sides are often exactly one of ``sides`` (e.g. TAL's small-box threshold
  ``strides[1]``, where the enlargement rule ``side < threshold`` flips).

Boxes within an image are distinct (identical GTs tie on every cost).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

STRIDES = (8, 16, 32)


def _anchor_centres(extent, strides):
    return sorted({int((i + 0.5) * s) for s in strides for i in range(extent // s)})


@st.composite
def _span(draw, extent, lattice, sides, min_side):
    """``(lo, hi)`` whole-pixel interval of length >= min_side inside ``[0, extent]``."""
    mode = draw(st.sampled_from(("corners", "centre")))
    if mode == "centre":  # centre on a multiple of 4 px, half-side whole
        centre = draw(st.sampled_from(list(range(4, extent, 4))))
        half_sides = sorted({s // 2 for s in sides if s % 2 == 0} | {max(1, (min_side + 1) // 2)})
        half = draw(st.one_of(st.integers(max(1, (min_side + 1) // 2), min(centre, extent - centre)),
                              st.sampled_from([h for h in half_sides if h <= min(centre, extent - centre)] or [1])))
        return centre - half, centre + half
    starts = [c for c in lattice if c <= extent - min_side]
    lo = draw(st.one_of(st.integers(0, extent - min_side), st.sampled_from(starts)))
    ends = [lo + s for s in sides if lo + s <= extent] + [c for c in lattice if c >= lo + min_side]
    hi = draw(st.one_of(st.integers(lo + min_side, extent), st.sampled_from(ends or [extent])))
    return lo, hi


@st.composite
def gt_rows(draw, *, batch, max_count, img_hw, nc, strides=STRIDES, sides=(), min_side=1, min_count=0):
    """``(N, 6)`` float32 rows ``[img, cls, cx, cy, w, h]`` (normalised) for ``batch`` images.

    Args:
      max_count: at most this many boxes per image (``min_count`` at least).
      img_hw: ``(H, W)`` pixels, powers of two.
      strides: the anchor strides whose centres the corners aim at.
      sides: side lengths (pixels) to hit exactly.
      min_side: the shortest side drawn (pixels).
    """
    h_img, w_img = img_hw
    assert h_img & (h_img - 1) == 0 and w_img & (w_img - 1) == 0, "powers of two keep coordinates exact"
    box = st.tuples(
        _span(w_img, _anchor_centres(w_img, strides), sides, min_side),
        _span(h_img, _anchor_centres(h_img, strides), sides, min_side),
    )
    rows = []
    for b in range(batch):
        boxes = draw(st.lists(box, min_size=min_count, max_size=max_count, unique=True))
        for (x1, x2), (y1, y2) in boxes:
            cls = draw(st.integers(0, nc - 1))
            rows.append([b, cls, (x1 + x2) / 2 / w_img, (y1 + y2) / 2 / h_img, (x2 - x1) / w_img, (y2 - y1) / h_img])
    return np.asarray(rows, np.float32).reshape(-1, 6)


#: Hostile prediction values: NaN, infinities, large and float32-edge logits.
HOSTILE_VALUES = (float("nan"), float("inf"), float("-inf"), 1e4, -1e4, 3e38, -3e38)


@st.composite
def corruptions(draw, *, grids, channels, anchors=1, batch=1, max_count=3):
    """1..max_count ``(level, b, y, x, anchor, channel, value)`` tuples: where in a
    list of ``(B, H_l, W_l[, na], C)`` prediction levels to write a hostile value.

    Args:
      grids: ``(H_l, W_l)`` per level; channels: ``C``; anchors: ``na`` (1 for
      anchor-free layouts, where the anchor entry is 0 and unused).
    """
    out = []
    for _ in range(draw(st.integers(1, max_count))):
        level = draw(st.integers(0, len(grids) - 1))
        h, w = grids[level]
        out.append(
            (
                level,
                draw(st.integers(0, batch - 1)),
                draw(st.integers(0, h - 1)),
                draw(st.integers(0, w - 1)),
                draw(st.integers(0, anchors - 1)),
                draw(st.integers(0, channels - 1)),
                draw(st.sampled_from(HOSTILE_VALUES)),
            )
        )
    return out
