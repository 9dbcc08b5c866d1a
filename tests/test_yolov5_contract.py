"""Contract tests for ``jaxyolo.yolov5_loss``: compilation (one trace, vmap),
padding invariance, empty inputs, dtypes, layouts, bad input, config helpers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, VALUE_TOL

import jaxyolo
from jaxyolo.assign import yolov5_build_targets
from jaxyolo.objectives.yolov5 import yolov5_default_balance

ANCHORS = np.array(
    [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]], np.float32
).reshape(3, 3, 2)
STRIDES = (8, 16, 32)
B, IMG, NC, M = 2, 64, 4, 16


def preds_for(rng, batch=B, img=IMG, nc=NC, scale=1.5):
    return [jnp.asarray(rng.normal(0, scale, (batch, img // s, img // s, 3, 5 + nc)), jnp.float32) for s in STRIDES]


def rows_for(rng, counts, nc=NC):
    rows = []
    for b, n in enumerate(counts):
        for _ in range(n):
            w, h = rng.uniform(0.02, 0.6, 2)
            rows.append([b, int(rng.integers(nc)), *rng.uniform(0, 1, 2), w, h])
    return np.asarray(rows, np.float32).reshape(-1, 6)


def loss(preds, targets, config=jaxyolo.Yolov5LossConfig(), state=None):
    return jaxyolo.yolov5_loss(preds, targets, anchors=ANCHORS, strides=STRIDES, config=config, state=state)


jloss = jax.jit(loss, static_argnums=2)


@jax.jit
def value_and_grad(preds, targets):
    return jax.value_and_grad(lambda p: loss(p, targets)[0])(preds)


# ----------------------------------------------------------------------------- compilation


def test_one_trace_for_twenty_batches():
    rng = np.random.default_rng(0)
    traces = []

    @jax.jit
    def step(preds, targets):
        traces.append(1)  # Python side effect: runs once per trace
        return jax.value_and_grad(lambda p: loss(p, targets)[0])(preds)

    preds = preds_for(rng)
    totals = set()
    for i in range(20):
        counts = [i % (M + 1), (3 * i) % (M + 1)]
        targets = jaxyolo.Targets.from_rows(rows_for(rng, counts), B, M)
        total, grads = step(preds, targets)
        assert np.isfinite(float(total)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
        totals.add(round(float(total), 6))
    assert len(traces) == 1
    assert len(totals) > 15  # the batches really differ


def test_vmap_over_batches_matches_loop():
    rng = np.random.default_rng(1)
    stacks = [preds_for(rng) for _ in range(3)]
    tgts = [jaxyolo.Targets.from_rows(rows_for(rng, [i * 3, 7 - i]), B, M) for i in range(3)]
    preds = [jnp.stack([s[level] for s in stacks]) for level in range(3)]
    targets = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *tgts)
    totals, grads = jax.jit(jax.vmap(jax.value_and_grad(lambda p, t: loss(p, t)[0])))(preds, targets)
    for i in range(3):
        total, g = value_and_grad(stacks[i], tgts[i])
        np.testing.assert_allclose(float(totals[i]), float(total), **VALUE_TOL)
        for level in range(3):
            np.testing.assert_allclose(np.asarray(grads[level][i]), np.asarray(g[level]), **GRAD_TOL)


# ----------------------------------------------------------------------------- padding and empties


def test_padding_rows_are_inert():
    """More padding, and garbage in padded rows (even bad class ids), change nothing."""
    rng = np.random.default_rng(3)
    preds = preds_for(rng)
    rows = rows_for(rng, [5, 9])
    small = jaxyolo.Targets.from_rows(rows, B, 9)
    big = jaxyolo.Targets.from_rows(rows, B, M)
    noise = jnp.asarray(rng.uniform(0, 1, (B, M, 4)), jnp.float32)
    dirty = jaxyolo.Targets(
        boxes=jnp.where(big.mask[..., None], big.boxes, noise),
        classes=jnp.where(big.mask, big.classes, 99),
        mask=big.mask,
    )
    ref_total, ref_grads = value_and_grad(preds, small)
    for t in (big, dirty):
        total, grads = value_and_grad(preds, t)
        np.testing.assert_allclose(float(total), float(ref_total), **VALUE_TOL)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), **GRAD_TOL)


@pytest.mark.parametrize("max_boxes", [0, 4])
def test_no_boxes_is_finite(max_boxes):
    """No boxes (all rows padded, or M = 0): finite values and gradients, box and
    class terms exactly zero."""
    rng = np.random.default_rng(4)
    preds = preds_for(rng)
    targets = jaxyolo.Targets(
        jnp.zeros((B, max_boxes, 4), jnp.float32), jnp.zeros((B, max_boxes), jnp.int32), jnp.zeros((B, max_boxes), bool)
    )
    total, comps, _ = jloss(preds, targets)
    grads = jax.jit(jax.grad(lambda p, t: loss(p, t)[0]))(preds, targets)
    assert np.isfinite(float(total)) and float(comps["box"]) == 0.0 and float(comps["cls"]) == 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    # Only the objectness channel gets gradient.
    assert all(float(jnp.abs(g[..., :4]).max()) == 0.0 and float(jnp.abs(g[..., 5:]).max()) == 0.0 for g in grads)


def test_extreme_logits_and_tiny_boxes_are_finite():
    rng = np.random.default_rng(5)
    preds = [p * 60.0 for p in preds_for(rng)]
    rows = np.array([[0, 1, 0.5, 0.5, 1e-6, 1e-6], [0, 2, 0.0, 0.0, 0.03, 0.03], [1, 0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    targets = jaxyolo.Targets.from_rows(rows, B, M)
    total, grads = value_and_grad(preds, targets)
    assert np.isfinite(float(total))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# ----------------------------------------------------------------------------- dtypes and layouts


def test_bf16_predictions_computed_in_float32():
    rng = np.random.default_rng(6)
    preds = [p.astype(jnp.bfloat16) for p in preds_for(rng)]
    targets = jaxyolo.Targets.from_rows(rows_for(rng, [4, 6]), B, M)
    total, comps, state = jloss(preds, targets)
    assert total.dtype == jnp.float32 and comps["obj"].dtype == jnp.float32
    ref, _, _ = jloss([p.astype(jnp.float32) for p in preds], targets)
    np.testing.assert_allclose(float(total), float(ref), **VALUE_TOL)


def test_flat_channel_layout_matches():
    """A ``(B, H, W, na * (5 + nc))`` head output is split as ``(na, 5 + nc)``."""
    rng = np.random.default_rng(7)
    preds = preds_for(rng)
    targets = jaxyolo.Targets.from_rows(rows_for(rng, [6, 3]), B, M)
    flat = [p.reshape(p.shape[:3] + (-1,)) for p in preds]
    np.testing.assert_array_equal(np.asarray(jloss(flat, targets)[0]), np.asarray(jloss(preds, targets)[0]))


def test_build_targets_shapes_are_static():
    rng = np.random.default_rng(8)
    for counts in ([0, 0], [3, 16]):
        targets = jaxyolo.Targets.from_rows(rows_for(rng, counts), B, M)
        levels = yolov5_build_targets(
            targets, anchors=ANCHORS, strides=STRIDES, feature_shapes=[(8, 8), (4, 4), (2, 2)]
        )
        assert len(levels) == 3
        for lt in levels:
            assert lt.mask.shape == (5, 3, B, M) and lt.tbox.shape == (5, 3, B, M, 4)
            assert lt.anchor_wh.shape == (5, 3, B, M, 2)
            assert lt.flat().mask.shape == (5 * 3 * B * M,)


# ----------------------------------------------------------------------------- state


def test_state_threading():
    rng = np.random.default_rng(9)
    preds = preds_for(rng)
    targets = jaxyolo.Targets.from_rows(rows_for(rng, [4, 4]), B, M)
    cfg0 = jaxyolo.Yolov5LossConfig()
    total0, _, s0 = jloss(preds, targets, cfg0, None)
    np.testing.assert_array_equal(np.asarray(s0["balance"]), np.float32([4.0, 1.0, 0.4]))
    total1, _, s1 = jloss(preds, targets, cfg0, s0)
    assert float(total0) == float(total1)  # no autobalance: state passes through
    np.testing.assert_array_equal(np.asarray(s1["balance"]), np.asarray(s0["balance"]))
    cfg = jaxyolo.Yolov5LossConfig(autobalance=True)
    _, _, s2 = jloss(preds, targets, cfg)
    assert float(s2["balance"][1]) == 1.0 and not np.allclose(np.asarray(s2["balance"]), [4.0, 1.0, 0.4], rtol=0, atol=1e-7)
    # a different state really changes the weighting
    total3, _, _ = jloss(preds, targets, cfg0, {"balance": jnp.float32([1.0, 1.0, 1.0])})
    assert float(total3) != float(total0)


def test_default_balance():
    assert yolov5_default_balance(3) == (4.0, 1.0, 0.4)
    assert yolov5_default_balance(4) == (4.0, 1.0, 0.25, 0.06)
    assert yolov5_default_balance(5) == (4.0, 1.0, 0.25, 0.06, 0.02)
    with pytest.raises(ValueError, match="balance"):
        yolov5_default_balance(6)


# ----------------------------------------------------------------------------- bad input


def _targets(rng, nc=NC):
    return jaxyolo.Targets.from_rows(rows_for(rng, [3, 2], nc=nc), B, M)


def test_bad_class_ids():
    rng = np.random.default_rng(10)
    preds = preds_for(rng)
    t = _targets(rng)
    bad = jaxyolo.Targets(t.boxes, t.classes.at[0, 0].set(NC), t.mask)
    with pytest.raises(ValueError, match="classes"):
        loss(preds, bad)
    total = jloss(preds, bad)[0]  # cannot raise under jit: poisoned
    assert np.isnan(float(total))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(anchors=ANCHORS[:, :, :1]), ValueError, "anchors"),
        (dict(anchors=ANCHORS[:2]), ValueError, "levels"),
        (dict(strides=(8, 16)), ValueError, "levels"),
        (dict(strides=(8, 16, 64)), ValueError, "stride"),
        (dict(strides=(8, 0, 32)), ValueError, "positive"),
        (dict(config={"box": 0.05}), TypeError, "Yolov5LossConfig"),
        (dict(config=jaxyolo.Yolov5LossConfig(autobalance=True), strides=(8, 32, 64)), ValueError, "stride-16"),
        (dict(state={"balance": jnp.ones(2)}), ValueError, "balance"),
        (dict(state=[1.0, 1.0, 1.0]), TypeError, "state"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    rng = np.random.default_rng(11)
    args = dict(anchors=ANCHORS, strides=STRIDES)
    args.update(kwargs)
    preds = preds_for(rng)
    if kwargs.get("strides") == (8, 32, 64):  # a consistent grid without a stride-16 level
        preds = [jnp.zeros((B, 8, 8, 3, 5 + NC)), jnp.zeros((B, 2, 2, 3, 5 + NC)), jnp.zeros((B, 1, 1, 3, 5 + NC))]
    with pytest.raises(exc, match=match):
        jaxyolo.yolov5_loss(preds, _targets(rng), **args)


def test_bad_predictions():
    rng = np.random.default_rng(12)
    preds = preds_for(rng)
    t = _targets(rng)
    call = lambda p, t=t: jaxyolo.yolov5_loss(p, t, anchors=ANCHORS, strides=STRIDES)  # noqa: E731
    with pytest.raises(ValueError, match="na \\* \\(5 \\+ nc\\)"):
        call([p.reshape(p.shape[:3] + (-1,))[..., :-1] for p in preds])
    with pytest.raises(ValueError, match="anchors"):
        call([p[..., :2, :] for p in preds])
    with pytest.raises(ValueError, match="5 \\+ nc"):
        call([p[..., :5] for p in preds])
    with pytest.raises(ValueError, match="stride"):
        call([preds[0], preds[1][:, :3], preds[2]])
    with pytest.raises(ValueError, match="levels"):
        call(preds[:2])
    with pytest.raises(TypeError, match="floating"):
        call([p.astype(jnp.int32) for p in preds])
    with pytest.raises(TypeError, match="list"):
        call(preds[0])
    with pytest.raises(ValueError, match="batch size"):
        call([p[:1] for p in preds])
    with pytest.raises(TypeError, match="Targets"):
        jaxyolo.yolov5_loss(preds, t.to_rows(), anchors=ANCHORS, strides=STRIDES)
    with pytest.raises(TypeError, match="strides"):
        jax.jit(lambda s: call_with_strides(preds, t, s))(jnp.asarray(STRIDES, jnp.float32))


def call_with_strides(preds, t, strides):
    return jaxyolo.yolov5_loss(preds, t, anchors=ANCHORS, strides=strides)[0]


def test_bad_config():
    with pytest.raises(ValueError, match="anchor_t"):
        jaxyolo.Yolov5LossConfig(anchor_t=0.0)
    with pytest.raises(ValueError, match="fl_gamma"):
        jaxyolo.Yolov5LossConfig(fl_gamma=-1.0)
    with pytest.raises(TypeError, match="box"):
        jaxyolo.Yolov5LossConfig(box="0.05")
    with pytest.raises(TypeError, match="gr"):
        jaxyolo.Yolov5LossConfig(gr=float("nan"))


# ----------------------------------------------------------------------------- hyp rescaling


def test_scale_yolov5_hyp_is_train_py():
    base = jaxyolo.Yolov5LossConfig()
    cfg = jaxyolo.scale_yolov5_hyp(base, nc=20, num_levels=4, img_size=1280)
    # train.py: hyp['box'] *= 3 / nl; hyp['cls'] *= nc / 80 * 3 / nl; hyp['obj'] *= (imgsz / 640) ** 2 * 3 / nl
    box, cls, obj = 0.05, 0.5, 1.0
    box *= 3 / 4
    cls *= 20 / 80 * 3 / 4
    obj *= (1280 / 640) ** 2 * 3 / 4
    assert (cfg.box, cfg.cls, cfg.obj) == (box, cls, obj)
    assert dataclasses.replace(cfg, box=base.box, cls=base.cls, obj=base.obj) == base
    as_dict = jaxyolo.scale_yolov5_hyp(dict(base.hyp(), lr0=0.01), nc=20, num_levels=4, img_size=1280)
    assert (as_dict["box"], as_dict["cls"], as_dict["obj"], as_dict["lr0"]) == (box, cls, obj, 0.01)
    # The defaults (80 classes, 3 levels, 640 px) are the identity.
    assert jaxyolo.scale_yolov5_hyp(base, nc=80) == base
    with pytest.raises(TypeError, match="hyp"):
        jaxyolo.scale_yolov5_hyp([0.05], nc=80)
    with pytest.raises(ValueError, match="nc"):
        jaxyolo.scale_yolov5_hyp(base, nc=0)
