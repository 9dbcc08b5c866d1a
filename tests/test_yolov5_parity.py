"""Parity of ``jaxyolo.yolov5_loss`` / ``yolov5_build_targets`` with yolov5==7.0.14.

Every case compares, against upstream ``ComputeLoss`` on the same inputs (one
torch thread): the total, the three components, the gradient w.r.t. every
prediction level, and the build_targets rows per level (as sets *and* in
upstream's order).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _strategies import gt_rows
from conftest import GRAD_TOL, VALUE_TOL
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxyolo
from jaxyolo.assign import yolov5_build_targets
from jaxyolo.testing.oracles.yolov5 import Yolov5Oracle

ANCHORS_P5 = np.array(
    [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]], np.float32
).reshape(3, 3, 2)
ANCHORS_P6 = np.array(
    [
        [19, 27, 44, 40, 38, 94],
        [96, 68, 86, 152, 180, 137],
        [140, 301, 303, 264, 238, 542],
        [436, 615, 739, 380, 925, 792],
    ],
    np.float32,
).reshape(4, 3, 2)
ANCHORS_P7 = np.array(
    [
        [6, 8, 12, 10, 10, 22],
        [19, 27, 44, 40, 38, 94],
        [96, 68, 86, 152, 180, 137],
        [140, 301, 303, 264, 238, 542],
        [436, 615, 739, 380, 925, 792],
    ],
    np.float32,
).reshape(5, 3, 2)
P5 = (8, 16, 32)
P6 = (8, 16, 32, 64)
P7 = (8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _step(strides, config, anchors_key):
    """Jitted ``value_and_grad`` of the total (aux: components, state); cached
    per static setup so cases with equal shapes share one compilation."""
    anchors = np.asarray(anchors_key, np.float32).reshape(len(strides), -1, 2)

    @jax.jit
    def step(preds, targets, state):
        def f(p):
            total, comps, new_state = jaxyolo.yolov5_loss(
                p, targets, anchors=anchors, strides=strides, config=config, state=state
            )
            return total, (comps, new_state)

        return jax.value_and_grad(f, has_aux=True)(preds)

    return step


def jax_loss(preds, targets, *, anchors, strides, config, state=None, jit=True):
    if jit:
        step = _step(tuple(strides), config, tuple(np.asarray(anchors, np.float32).ravel().tolist()))
        (total, (comps, new_state)), grads = step([jnp.asarray(p) for p in preds], targets, state)
    else:

        def f(p):
            total, comps, new_state = jaxyolo.yolov5_loss(
                p, targets, anchors=anchors, strides=strides, config=config, state=state
            )
            return total, (comps, new_state)

        (total, (comps, new_state)), grads = jax.value_and_grad(f, has_aux=True)([jnp.asarray(p) for p in preds])
    return total, comps, new_state, grads


def make_preds(rng, batch, img_hw, strides, nc, *, na=3, scale=1.5):
    h, w = img_hw
    return [rng.normal(0.0, scale, (batch, h // s, w // s, na, 5 + nc)).astype(np.float32) for s in strides]


def random_rows(rng, batch, nc, max_boxes, *, empty_images=(), min_wh=0.005, max_wh=0.7):
    rows = []
    for b in range(batch):
        n = 0 if b in empty_images else int(rng.integers(0, max_boxes + 1))
        for _ in range(n):
            w, h = rng.uniform(min_wh, max_wh, 2)
            cx, cy = rng.uniform(0.0, 1.0, 2)
            rows.append([b, int(rng.integers(nc)), cx, cy, w, h])
    return np.asarray(rows, np.float32).reshape(-1, 6)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))) if a.size else 0.0


def sorted_rows(rows):
    rows = np.asarray(rows, np.float64)
    return rows[np.lexsort(rows.T[::-1])] if len(rows) else rows


_build_targets = jax.jit(yolov5_build_targets, static_argnames=("strides", "feature_shapes", "anchor_t"))


def build_targets(targets, preds, *, anchors, strides, anchor_t=4.0):
    shapes = tuple(tuple(np.shape(p)[1:3]) for p in preds)
    return _build_targets(targets, anchors=anchors, strides=tuple(strides), feature_shapes=shapes, anchor_t=anchor_t)


def assert_rows_match(targets, preds, *, anchors, strides, config, oracle_rows):
    levels = build_targets(targets, preds, anchors=anchors, strides=strides, anchor_t=config.anchor_t)
    assert len(levels) == len(oracle_rows)
    for i, (lt, ref) in enumerate(zip(levels, oracle_rows)):
        mine = lt.rows()
        assert mine.shape == ref.shape, f"level {i}: {mine.shape} rows vs upstream {ref.shape}"
        # As sets (the criterion) ...
        np.testing.assert_allclose(sorted_rows(mine), sorted_rows(ref), **VALUE_TOL, err_msg=f"level {i} (set)")
        # ... and, stronger, in upstream's (offset, anchor, target) order.
        np.testing.assert_allclose(mine, ref, **VALUE_TOL, err_msg=f"level {i} (order)")
    return levels


#: Measured errors of every check_case call: (what, max abs, max rel, max |ref|) -- for reports.
ERRORS: list[tuple[str, float, float, float]] = []


def _record(what, mine, ref):
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    if mine.size:
        ERRORS.append((what, float(np.max(np.abs(mine - ref))), rel_err(mine, ref), float(np.max(np.abs(ref)))))


def check_case(
    preds, targets, *, anchors, strides, config=jaxyolo.Yolov5LossConfig(), oracle=None, state=None, jit=True
):
    """Compare one call with upstream; returns (jax outputs, oracle outputs)."""
    nc = preds[0].shape[-1] - 5
    if oracle is None:
        oracle = Yolov5Oracle(
            anchors=anchors,
            strides=strides,
            nc=nc,
            hyp=config.hyp(),
            autobalance=config.autobalance,
            sort_obj_iou=config.sort_obj_iou,
            gr=config.gr,
            balance=config.balance,
        )
    ref = oracle(preds, targets)
    total, comps, new_state, grads = jax_loss(
        preds, targets, anchors=anchors, strides=strides, config=config, state=state, jit=jit
    )
    assert ref["total_shape"] == (1,)  # upstream's shape; ours is a scalar
    assert np.shape(total) == ()
    np.testing.assert_allclose(float(total), ref["total"], **VALUE_TOL)
    mine = np.array([comps["box"], comps["obj"], comps["cls"]])
    np.testing.assert_allclose(mine, ref["components"], **VALUE_TOL)
    _record("total", float(total), ref["total"])
    _record("components", mine, ref["components"])
    for i, (g, r) in enumerate(zip(grads, ref["grads"])):
        _record("grad", g, r)
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), r, **GRAD_TOL, err_msg=f"grad level {i}")
    assert_rows_match(targets, preds, anchors=anchors, strides=strides, config=config, oracle_rows=ref["rows"])
    return (total, comps, new_state, grads), ref


def duplicate_cells(targets, preds, *, anchors, strides):
    """Number of positives that share an (image, anchor, cell) with an earlier one."""
    levels = build_targets(targets, preds, anchors=anchors, strides=strides)
    dups = 0
    for lt in levels:
        rows = lt.rows()[:, :4]
        dups += len(rows) - len(np.unique(rows, axis=0))
    return dups


# ----------------------------------------------------------------------------- cases

# Most P5 cases share one shape (and so one compilation): B = 2, 64 x 64, nc = 4, M = 32.
B, IMG, NC, M = 2, (64, 64), 4, 32


def standard(rng, rows, **kw):
    return jaxyolo.Targets.from_rows(rows, B, M), make_preds(rng, B, IMG, P5, NC, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_batches(seed):
    rng = np.random.default_rng(100 + seed)
    rows = random_rows(rng, B, NC, 30, empty_images=(seed % B,))  # one image without boxes
    targets, preds = standard(rng, rows)
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)


def test_eager_path_matches():
    rng = np.random.default_rng(7)
    targets = jaxyolo.Targets.from_rows(random_rows(rng, 1, 3, 6), 1, 6)
    preds = make_preds(rng, 1, (32, 32), P5, 3)
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5, jit=False)


def test_no_boxes_at_all():
    rng = np.random.default_rng(3)
    targets, preds = standard(rng, np.zeros((0, 6)))
    (total, comps, _, grads), _ = check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)
    assert float(comps["box"]) == 0.0 and float(comps["cls"]) == 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def _border_rows():
    # 64 px image: grids 8, 4, 2 -> dyadic centres give exact integer / .5 grid positions.
    rows = []
    for cx, cy in [
        (0.25, 0.5),  # gx = 2, 1, 0.5: integer on two levels (both neighbours), .5 on P5
        (0.375, 0.625),  # gx = 3, 1.5, .75: fraction exactly 0.5 on P4 -> no neighbour
        (0.5625, 0.4375),  # gx = 4.5: fraction 0.5 on P3
        (1.0, 0.3),  # x = 1.0: gx = W, clamped cell, tbox_x = 1
        (0.7, 1.0),  # y = 1.0
        (1.0, 1.0),
        (0.0, 0.0),  # the corner: own and right/down slots share the cell
        (0.0, 0.5),
        (0.125, 0.125),  # gx = 1 exactly on P3: gxy > 1 is False
        (0.875, 0.875),  # gxi = 1 exactly on P3
    ]:
        for w, h in [(0.2, 0.3), (0.05, 0.04)]:
            rows.append([0, 1, cx, cy, w, h])
    # Boxes touching the image border.
    for w, h in [(0.3, 0.2), (0.12, 0.5), (1.0, 1.0)]:
        rows.append([1, 2, w / 2, h / 2, w, h])
        rows.append([1, 0, 1 - w / 2, 1 - h / 2, w, h])
    return np.asarray(rows, np.float32)


def test_cell_borders_and_image_borders():
    rng = np.random.default_rng(4)
    targets, preds = standard(rng, _border_rows())
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)
    assert duplicate_cells(targets, preds, anchors=ANCHORS_P5, strides=P5) > 0


def test_border_quirks_are_upstream():
    """x = 1.0 lands in the last cell with tbox_x = 1.0 (in-place clamp_); a
    fractional part of exactly 0.5 takes no neighbour; an integer one takes both."""
    targets = jaxyolo.Targets.from_rows(
        np.array([[0, 0, 1.0, 0.3, 0.1, 0.1], [0, 0, 0.5625, 0.3, 0.1, 0.1], [0, 0, 0.25, 0.3, 0.1, 0.1]]), 1, 3
    )
    (lt,) = build_targets(targets, [np.zeros((1, 8, 8, 3, 6))], anchors=ANCHORS_P5[:1], strides=(8,))
    rows = lt.rows()
    x1 = rows[(rows[:, 3] == 7) & (np.isclose(rows[:, 4], 1.0))]
    assert len(x1) > 0  # clamped cell, tbox_x = gx - clamped gi = 8 - 7
    first_anchor = np.asarray(lt.mask)[:, 0, 0, :]  # (5, M) slots of anchor 0
    # gx = 4.5 (fraction 0.5): neither left nor right; gy = 2.4: up only.
    assert first_anchor[:, 1].tolist() == [True, False, True, False, False]
    assert first_anchor[1, 2] and first_anchor[3, 2]  # gx = 2: both left and right


def test_crowded_duplicates():
    """Many boxes in a few cells: torch's last-writer-wins must be reproduced."""
    rng = np.random.default_rng(5)
    rows = []
    for b in range(2):
        for _ in range(30):
            cx, cy = rng.choice([0.3, 0.31, 0.52, 0.55]), rng.choice([0.4, 0.42, 0.6])
            w, h = rng.uniform(0.05, 0.4, 2)
            rows.append([b, int(rng.integers(NC)), cx, cy, w, h])
    targets, preds = standard(rng, np.asarray(rows, np.float32))
    assert duplicate_cells(targets, preds, anchors=ANCHORS_P5, strides=P5) > 100
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5, config=jaxyolo.Yolov5LossConfig(sort_obj_iou=True))


def test_sort_obj_iou_random():
    rng = np.random.default_rng(6)
    targets, preds = standard(rng, random_rows(rng, B, NC, 30), scale=0.7)
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5, config=jaxyolo.Yolov5LossConfig(sort_obj_iou=True))


def test_non_square_320x480():
    rng = np.random.default_rng(8)
    targets = jaxyolo.Targets.from_rows(random_rows(rng, 2, 6, 20, min_wh=0.01, max_wh=0.5), 2, 20)
    preds = make_preds(rng, 2, (320, 480), P5, 6)
    assert preds[0].shape[1:3] == (40, 60)
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)


def test_four_levels():
    rng = np.random.default_rng(9)
    targets = jaxyolo.Targets.from_rows(random_rows(rng, 2, 3, 20), 2, 20)
    preds = make_preds(rng, 2, (128, 128), P6, 3)
    check_case(preds, targets, anchors=ANCHORS_P6, strides=P6)


def test_five_levels():
    rng = np.random.default_rng(10)
    targets = jaxyolo.Targets.from_rows(random_rows(rng, 2, 3, 20), 2, 20)
    preds = make_preds(rng, 2, (256, 256), P7, 3)
    check_case(preds, targets, anchors=ANCHORS_P7, strides=P7)


def test_single_class():
    rng = np.random.default_rng(11)
    targets = jaxyolo.Targets.from_rows(random_rows(rng, B, 1, 20), B, M)
    preds = make_preds(rng, B, IMG, P5, 1)
    (_, comps, _, grads), _ = check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)
    assert float(comps["cls"]) == 0.0
    assert np.all(np.asarray(grads[0])[..., 5:] == 0.0)


@pytest.mark.parametrize(
    "config",
    [
        jaxyolo.Yolov5LossConfig(label_smoothing=0.1),
        jaxyolo.Yolov5LossConfig(fl_gamma=1.5),
        jaxyolo.Yolov5LossConfig(
            fl_gamma=2.0,
            label_smoothing=0.05,
            cls_pw=1.7,
            obj_pw=0.6,
            gr=0.5,
            anchor_t=2.9,
            box=0.07,
            obj=0.8,
            cls=0.3,
            balance=(3.0, 1.5, 0.5),
        ),
    ],
    ids=["label_smoothing", "focal", "focal_smoothing_pw_gr_anchor_t_gains_balance"],
)
def test_hyperparameters(config):
    rng = np.random.default_rng(12)
    targets, preds = standard(rng, random_rows(rng, B, NC, 16))
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5, config=config)


def test_scaled_hyp_matches_upstream():
    """train.py's rescaled gains (nc=4, 3 levels, 64 px) go through unchanged."""
    rng = np.random.default_rng(13)
    config = jaxyolo.scale_yolov5_hyp(jaxyolo.Yolov5LossConfig(), nc=NC, num_levels=3, img_size=IMG[0])
    targets, preds = standard(rng, random_rows(rng, B, NC, 10))
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5, config=config)


def test_autobalance_five_calls():
    rng = np.random.default_rng(14)
    config = jaxyolo.Yolov5LossConfig(autobalance=True)
    oracle = Yolov5Oracle(anchors=ANCHORS_P5, strides=P5, nc=NC, hyp=config.hyp(), autobalance=True)
    state = None
    balances = []
    for _ in range(5):
        targets, preds = standard(rng, random_rows(rng, B, NC, 12))
        (_, _, state, _), ref = check_case(
            preds, targets, anchors=ANCHORS_P5, strides=P5, config=config, oracle=oracle, state=state
        )
        np.testing.assert_allclose(np.asarray(state["balance"]), ref["balance"], **VALUE_TOL)
        balances.append(np.asarray(state["balance"]))
    assert balances[-1][1] == 1.0  # normalised by the stride-16 level
    assert not np.allclose(balances[-1], [4.0, 1.0, 0.4], rtol=0, atol=1e-7)  # it did move


@settings(max_examples=8)
@given(
    rows=gt_rows(batch=B, max_count=M, img_hw=IMG, nc=NC, strides=P5),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
)
def test_property_random_parity(rows, seed, scale):
    """Drawn boxes (centres often on multiples of 4 px: cell borders and half-cells of
    every level; sides from 1 px to the image) and logit scales: same numbers as upstream."""
    targets, preds = standard(np.random.default_rng(seed), rows, scale=scale)
    check_case(preds, targets, anchors=ANCHORS_P5, strides=P5)


def test_config_is_hashable_static():
    a = jaxyolo.Yolov5LossConfig(balance=[4.0, 1.0, 0.4])
    assert a.balance == (4.0, 1.0, 0.4)
    assert hash(a) == hash(dataclasses.replace(a))


def test_anchor_t_is_strict():
    """A width ratio of exactly ``anchor_t`` (either way) does not match, as upstream's ``<``.

    P3 anchor 0 is 10 x 13 px = 1.25 x 1.625 cells on the 8 x 8 grid of a 64 px
    image: w = 0.625 gives r = 5 / 1.25 = 4 and w = 5 / 128 gives 1 / r = 4,
    both exact in float32."""
    rows = np.array(
        [
            [0, 0, 0.4, 0.4, 0.625, 0.2],  # r_w == 4 exactly
            [0, 1, 0.4, 0.4, 0.62, 0.2],  # just inside
            [1, 2, 0.6, 0.6, 5 / 128, 0.2],  # 1 / r_w == 4 exactly
            [1, 3, 0.6, 0.6, 5.1 / 128, 0.2],  # just inside
        ],
        np.float32,
    )
    rng = np.random.default_rng(16)
    targets, preds = standard(rng, rows)
    oracle = Yolov5Oracle(anchors=ANCHORS_P5, strides=P5, nc=NC, hyp=jaxyolo.Yolov5LossConfig().hyp())
    ref = oracle.build_targets(preds, targets)
    assert_rows_match(targets, preds, anchors=ANCHORS_P5, strides=P5, config=jaxyolo.Yolov5LossConfig(), oracle_rows=ref)
    p3_anchor0 = ref[0][ref[0][:, 1] == 0]
    assert set(p3_anchor0[:, 10].astype(int)) == {1, 3}  # classes of the matched rows


def test_anchor_t_ratio_is_a_true_division():
    """A 12-px-high box against the 30-px-high P3 anchor 1 on a 64 px image: r = 1.5 / 3.75
    rounds to 0.4f and 1 / r to exactly 2.5 = anchor_t in torch, so upstream rejects the
    pair.  XLA's ``x / broadcast(a) -> x * broadcast(1 / a)`` rewrite gave 1 / r = 2.4999998
    and accepted it (found by test_property_build_targets)."""
    rows = np.array([[1, 0, 0.0546875, 0.125, 0.109375, 0.1875]], np.float32)  # x 0..7, y 2..14 px
    targets, preds = standard(np.random.default_rng(17), rows)
    config = jaxyolo.Yolov5LossConfig(anchor_t=2.5)
    ref = Yolov5Oracle(anchors=ANCHORS_P5, strides=P5, nc=NC, hyp=config.hyp()).build_targets(preds, targets)
    assert set(ref[0][:, 1].astype(int)) == {0}  # only P3 anchor 0 matches upstream
    assert_rows_match(targets, preds, anchors=ANCHORS_P5, strides=P5, config=config, oracle_rows=ref)


@settings(max_examples=30)
@given(
    rows=gt_rows(batch=B, max_count=M, img_hw=IMG, nc=NC, strides=P5,
                 sides=(4, 12, 15, 20, 24, 25, 40, 45, 64)),
    seed=st.integers(0, 2**31 - 1),
    anchor_t=st.sampled_from([4.0, 2.5, 1.5]),
)
def test_property_build_targets(rows, seed, anchor_t):
    """build_targets alone (cheap, so more examples): centres often on cell borders and
    half-cells of every level, and sides at exactly ``anchor_t`` times or over a P3 anchor
    side (10 x 13, 16 x 30 px: 40 = 4 * 10, 4 = 16 / 4, 25 = 2.5 * 10, 12 = 30 / 2.5,
    15 = 1.5 * 10, 45 = 1.5 * 30, ...), the strict ``r < anchor_t`` edge."""
    targets, preds = standard(np.random.default_rng(seed), rows)
    config = jaxyolo.Yolov5LossConfig(anchor_t=anchor_t)
    oracle = Yolov5Oracle(anchors=ANCHORS_P5, strides=P5, nc=NC, hyp=config.hyp())
    ref = oracle.build_targets(preds, targets)
    assert_rows_match(targets, preds, anchors=ANCHORS_P5, strides=P5, config=config, oracle_rows=ref)
