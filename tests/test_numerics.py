"""Hostile predictions and targets: a finite loss never hides a non-finite gradient.

The policy (docs/losses.md, "Numerics worth knowing"):

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


# --- the issue's reproductions and the targets' side ------------------------------------------------


def _one_gt(batch=1):
    return Targets.from_rows(np.array([[0, 0, 0.5, 0.5, 0.3, 0.3]]), batch_size=batch, max_boxes=2)


def test_yolox_overflowing_box_logit_is_finite_with_finite_gradients():
    """The issue's repro: exp(88) * 8 overflows float32.  Off the foreground nothing
    changes; on a positive the box is infinitely large: IoU 0, finite gradients."""

    def loss(p, t):
        total, comps, assignment = jaxyolo.yolox_loss(p, t, strides=(8,), return_assignment=True)
        return total, (comps["iou"], assignment.fg_mask)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    t = _one_gt()
    clean = jnp.zeros((1, 8, 8, 6))
    (v0, (iou0, fg)), g0 = grad([clean], t)
    (v, _), g = grad([clean.at[0, 0, 0, 2].set(88.0)], t)  # anchor (0, 0): no candidate
    assert float(v) == float(v0) == pytest.approx(49.90388, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(g0[0]))
    np.testing.assert_array_equal(np.asarray(g[0][0, 0, 0]), [0, 0, 0, 0, 0.5, 0])

    y, x = divmod(int(np.flatnonzero(np.asarray(fg[0]))[0]), 8)
    for channel, value in ((2, 88.0), (3, 1e4), (0, 3e38), (1, -3e38), (2, np.inf)):
        (v, (iou, _)), g = grad([clean.at[0, y, x, channel].set(value)], t)
        assert np.isfinite(v) and _finite(g), (channel, value, v)
        assert float(iou) > float(iou0)  # that positive now has IoU 0 (loss 1 - 0**2)
        np.testing.assert_array_equal(np.asarray(g[0][0, y, x, :4]), 0.0)  # no gradient beyond the bound
    # a NaN box at a positive makes its cost NaN: SimOTA passes it over (as
    # upstream's topk does) and the value may stay finite -- never its gradients
    (v, _), g = grad([clean.at[0, y, x, 2].set(np.nan)], t)
    assert not np.isfinite(v) or _finite(g)
    (v, _), _ = grad([clean.at[0, y, x, 4].set(np.nan)], t)  # a NaN that reaches the loss stops the run
    assert np.isnan(v)


def test_yolox_nan_box_channel_off_the_foreground_changes_nothing():
    grad = jax.jit(jax.value_and_grad(lambda p, t: jaxyolo.yolox_loss(p, t, strides=(8,))[0]))
    for t in (_one_gt(), Targets.from_rows(np.zeros((0, 6)), batch_size=1, max_boxes=2)):
        clean = jnp.zeros((1, 8, 8, 6))
        v0, g0 = grad([clean], t)
        for channel in range(4):
            v, g = grad([clean.at[0, 0, 0, channel].set(np.nan)], t)
            assert float(v) == float(v0)
            np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(g0[0]))


@pytest.mark.parametrize("cell", [(0, 0, 0, 0), (0, 3, 5, 2), (1, 7, 7, 1)])
def test_yolov5_nan_in_unassigned_anchor_is_ignored_everywhere(cell):
    """The issue: cell (0, 0), anchor 0 of image 0 was special (unused slots gather it)."""
    anchors = V5_ANCHORS[:1]
    grad = jax.jit(jax.value_and_grad(lambda p, t: jaxyolo.yolov5_loss(p, t, anchors=anchors, strides=(8,))[0]))
    empty = Targets.from_rows(np.zeros((0, 6)), batch_size=2, max_boxes=2)
    clean = jnp.zeros((2, 8, 8, 3, 7))
    v0, g0 = grad([clean], empty)
    for channel in (0, 1, 2, 3, 5, 6):
        v, g = grad([clean.at[cell + (channel,)].set(np.nan)], empty)
        assert float(v) == float(v0) == pytest.approx(8 * np.log(2), rel=1e-6)
        np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(g0[0]))


@pytest.mark.parametrize("nc", [None, 3])
@pytest.mark.parametrize("cls_id,match", [(2.0**31, "not representable as int32"), (1e20, "int32"),
                                          (0.5, "non-negative integers"), (-1.0, "non-negative integers")])
def test_from_rows_refuses_class_ids_beyond_int32(nc, cls_id, match):
    rows = np.array([[0, cls_id, 0.5, 0.5, 0.1, 0.1]])
    with pytest.raises(ValueError, match=match):
        Targets.from_rows(rows, batch_size=1, max_boxes=2, nc=nc)


def test_from_rows_keeps_the_largest_int32_class_id():
    t = Targets.from_rows(np.array([[0, 2.0**31 - 1, 0.5, 0.5, 0.1, 0.1]]), batch_size=1, max_boxes=2)
    assert int(t.classes[0, 0]) == 2**31 - 1


def test_nan_if_poisons_value_and_gradients():
    f = jax.value_and_grad(lambda x, c: nan_if(c, jnp.sum(x**2)))
    v, g = f(jnp.arange(3.0), False)
    assert float(v) == 5.0
    np.testing.assert_array_equal(np.asarray(g), [0.0, 2.0, 4.0])
    v, g = jax.jit(f)(jnp.arange(3.0), True)
    assert np.isnan(v) and np.all(np.isnan(g))


def _losses_for_targets():
    for name in ("yolov5", "yolox", "yolov8", "yolov9"):
        yield name, CASES[name][4], [jnp.asarray(p) for p in _preds(name, 0)]


@pytest.mark.parametrize("bad", ["class", "box"])
def test_invalid_targets_under_jit_poison_value_and_every_checked_gradient(bad):
    """An out-of-range class id (or a NaN box in a real row) under jit: value NaN and
    gradients NaN, so a loop that checks either stops; a padded row is ignored."""
    rows = np.array([[0, 1, 0.5, 0.5, 0.3, 0.3], [1, 0, 0.25, 0.5, 0.2, 0.4]])
    t = Targets.from_rows(rows, batch_size=B, max_boxes=M)
    if bad == "class":
        poisoned = Targets(t.boxes, t.classes.at[1, 0].set(NC), t.mask)
        padded = Targets(t.boxes, t.classes.at[1, 2].set(NC), t.mask)
    else:
        poisoned = Targets(t.boxes.at[1, 0, 2].set(jnp.nan), t.classes, t.mask)
        padded = Targets(t.boxes.at[1, 2, 2].set(jnp.nan), t.classes, t.mask)
    for name, always_read, preds in _losses_for_targets():
        f = _compiled(name)[0]  # the property tests' compiled functions
        v0, g0 = f(preds, t)
        v, g = f(preds, poisoned)
        assert np.isnan(v), name
        for level in g:  # objectness (TAL: class) channels see the NaN cotangent at every anchor
            assert np.all(np.isnan(np.asarray(level)[..., always_read])), name
        v, g = f(preds, padded)
        assert float(v) == float(v0), name
        for a, b in zip(g, g0):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
