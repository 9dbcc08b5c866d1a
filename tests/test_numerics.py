"""Hostile predictions and targets: a finite loss never hides a non-finite gradient.

The policy (README, "Numerics worth knowing"):

* a finite value comes with finite gradients, for every loss, level and position;
* a prediction upstream ignores (the box / class channels of an anchor that is no
  candidate of any GT) changes nothing, whatever it holds: value and gradients
  are bit-identical to the clean ones;
* a NaN that reaches the loss, a non-finite box in a real target row or a class
  id out of range make the value NaN (the latter two also every gradient);
* jit and eager agree on whether the value is finite.

Each property test compiles once (fixed shapes: 2 images, 2 levels of 8x8 and
4x4 cells, nc=2) and draws corruptions of random positions and channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _strategies import corruptions, gt_rows
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxyolo
from jaxyolo import Targets
from jaxyolo._math import nan_if
from jaxyolo.assign.yolov5 import build_targets_stacked, yolov5_anchors_and_strides

IMG = 64
STRIDES = (8, 16)
GRIDS = tuple((IMG // s, IMG // s) for s in STRIDES)
B, M, NC = 2, 3, 2
V5_ANCHORS = np.asarray([[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]]], np.float32)
REG_MAX = 8


def _finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


# --- the three losses, as (preds list, targets) -> total ------------------------------------------


def _v5(preds, targets):
    return jaxyolo.yolov5_loss(preds, targets, anchors=V5_ANCHORS, strides=STRIDES)[0]


def _yolox(preds, targets, use_l1=False):
    config = jaxyolo.YoloxLossConfig(use_l1=use_l1)
    return jaxyolo.yolox_loss(preds, targets, strides=STRIDES, config=config)[0]


def _tal(preds, targets, preset="ultralytics"):
    config = jaxyolo.TalLossConfig(preset=preset, reg_max=REG_MAX)
    return jaxyolo.yolov8_loss(preds, targets, strides=STRIDES, config=config)[0]


# --- which anchors a loss may read beyond objectness (conservative supersets) ----------------------


def _anchor_centres(level):
    h, w = GRIDS[level]
    s = STRIDES[level]
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return (xs + 0.5) * s, (ys + 0.5) * s


def _geometry_candidates(targets, half_extent):
    """Per level ``(B, H, W)`` bool: anchor centre within ``half_extent(w, h, stride)`` of a real GT centre."""
    boxes, mask = np.asarray(targets.boxes) * IMG, np.asarray(targets.mask)
    out = []
    for level, s in enumerate(STRIDES):
        ax, ay = _anchor_centres(level)
        cand = np.zeros((B,) + GRIDS[level], bool)
        for b, m in zip(*np.nonzero(mask)):
            cx, cy, w, h = boxes[b, m]
            hx, hy = half_extent(w, h, s)
            cand[b] |= (np.abs(ax - cx) < hx) & (np.abs(ay - cy) < hy)
        out.append(cand)
    return out


def _yolox_candidates(targets):
    # SimOTA 0.3.0: in box or within 2.5 strides of the centre; 1 px margin
    return _geometry_candidates(targets, lambda w, h, s: (max(w / 2, 2.5 * s) + 1, max(h / 2, 2.5 * s) + 1))


def _tal_candidates(targets):
    # TAL: anchor centre inside the GT (ultralytics enlarges GTs smaller than a stride); margins
    big = max(STRIDES)
    return _geometry_candidates(targets, lambda w, h, s: (max(w / 2, big) + 1, max(h / 2, big) + 1))


def _v5_candidates(targets):
    anchors_grid, _ = yolov5_anchors_and_strides(V5_ANCHORS, STRIDES)
    lt = build_targets_stacked(targets, anchors_grid, GRIDS, anchor_t=4.0).flat()
    out = []
    for level in range(len(STRIDES)):
        cand = np.zeros((B,) + GRIDS[level] + (3,), bool)
        keep = np.asarray(lt.mask[level])
        for field in (lt.image, lt.gj, lt.gi, lt.anchor):
            assert np.asarray(field[level]).shape == keep.shape
        idx = tuple(np.asarray(f[level])[keep] for f in (lt.image, lt.gj, lt.gi, lt.anchor))
        cand[idx] = True
        out.append(cand)
    return out


CASES = {
    # name: (loss, channels, anchors per cell, candidate cells, channels read at every anchor)
    "yolov5": (_v5, 5 + NC, 3, _v5_candidates, (4,)),
    "yolox": (_yolox, 5 + NC, 1, _yolox_candidates, (4,)),
    "yolox_l1": (functools.partial(_yolox, use_l1=True), 5 + NC, 1, _yolox_candidates, (4,)),
    "yolov8": (_tal, 4 * REG_MAX + NC, 1, _tal_candidates, tuple(range(4 * REG_MAX, 4 * REG_MAX + NC))),
    "yolov9": (functools.partial(_tal, preset="yolov9"), 4 * REG_MAX + NC, 1, _tal_candidates,
               tuple(range(4 * REG_MAX, 4 * REG_MAX + NC))),
}


@functools.lru_cache(maxsize=None)
def _compiled(name):
    loss = CASES[name][0]
    eager = jax.value_and_grad(loss)
    return jax.jit(eager), eager


def _preds(name, seed):
    _, c, na, _, _ = CASES[name]
    rng = np.random.default_rng(seed)
    extra = (na,) if name == "yolov5" else ()
    return [rng.normal(0.0, 1.0, (B,) + g + extra + (c,)).astype(np.float32) for g in GRIDS]


def _check_hostile(name, seed, rows, hits, nan_target, eager):
    """The invariant for one draw (see the module docstring)."""
    loss_jit, loss_eager = _compiled(name)
    _, _, na, candidates, always_read = CASES[name]
    preds = _preds(name, seed)
    targets = Targets.from_rows(rows, batch_size=B, max_boxes=M)
    v0, g0 = loss_jit([jnp.asarray(p) for p in preds], targets)
    assert np.isfinite(v0) and _finite(g0)

    cand = candidates(targets)
    ignored = True
    for level, b, y, x, a, c, value in hits:
        idx = (b, y, x, a, c) if na > 1 else (b, y, x, c)
        preds[level][idx] = value
        ignored &= c not in always_read and not cand[level][idx[:-1]]
    if nan_target is not None and rows.shape[0]:
        r = nan_target % rows.shape[0]
        b, m = int(rows[r, 0]), int(np.sum(rows[:r, 0] == rows[r, 0]))
        boxes = np.array(targets.boxes)
        boxes[b, m, nan_target % 4] = np.nan
        targets = Targets(jnp.asarray(boxes), targets.classes, targets.mask)
    else:
        nan_target = None
    preds = [jnp.asarray(p) for p in preds]

    v, g = loss_jit(preds, targets)
    if np.isfinite(v):
        assert _finite(g), f"finite value {v} with non-finite gradients"
    if nan_target is not None:
        assert np.isnan(v) and not _finite(g), "a NaN in a real target row must poison value and gradients"
    elif ignored:
        # upstream never reads these entries: nothing changes, bit for bit
        np.testing.assert_array_equal(np.asarray(v), np.asarray(v0))
        for a_, b_ in zip(g, g0):
            np.testing.assert_array_equal(np.asarray(a_), np.asarray(b_))
    if eager:
        ve, ge = loss_eager(preds, targets)
        assert bool(np.isfinite(ve)) == bool(np.isfinite(v)), f"jit {v} vs eager {ve}"
        if np.isfinite(ve):
            assert _finite(ge)


def _hostile_test(name, *, eager):
    """The property test of one loss: 200 jitted draws, or (``eager``) a few draws
    run both jitted and eagerly (eager dispatch costs up to ~1.5 s a call)."""
    _, c, na, _, _ = CASES[name]

    @settings(max_examples=12 if eager else 200, deadline=None, derandomize=True)
    @given(
        seed=st.integers(0, 3),
        rows=gt_rows(batch=B, max_count=M, img_hw=(IMG, IMG), nc=NC, strides=STRIDES),
        hits=corruptions(grids=GRIDS, channels=c, anchors=na, batch=B),
        nan_target=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 63)),
    )
    def test(seed, rows, hits, nan_target):
        _check_hostile(name, seed, rows, hits, nan_target, eager)

    test.__name__ = f"test_hostile_predictions_{name}" + ("_jit_vs_eager" if eager else "")
    return pytest.mark.slow(test) if eager else test


test_hostile_predictions_yolov5 = _hostile_test("yolov5", eager=False)
test_hostile_predictions_yolox = _hostile_test("yolox", eager=False)
test_hostile_predictions_yolox_l1 = _hostile_test("yolox_l1", eager=False)
test_hostile_predictions_yolov8_ultralytics = _hostile_test("yolov8", eager=False)
test_hostile_predictions_yolov8_yolov9 = _hostile_test("yolov9", eager=False)
test_hostile_predictions_yolov5_jit_vs_eager = _hostile_test("yolov5", eager=True)
test_hostile_predictions_yolox_jit_vs_eager = _hostile_test("yolox", eager=True)
test_hostile_predictions_yolov8_ultralytics_jit_vs_eager = _hostile_test("yolov8", eager=True)
test_hostile_predictions_yolov8_yolov9_jit_vs_eager = _hostile_test("yolov9", eager=True)
