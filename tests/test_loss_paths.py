"""The two assignment paths of the losses (``batched=``): the accelerator path
(``True``: SimOTA vmapped over images; TAL's top-k by rounds of row maxima) and
the CPU path (``False``: SimOTA under ``lax.map``; ``lax.top_k`` + scatter) give
bit-identical values, gradients and assignments on the CPU; ``None`` picks one
from ``jax.default_backend()`` at trace time; neither retraces across box counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _yolox_cases import STRIDES, clustered_targets, make_preds, make_targets
from test_tal_helpers import make_preds as make_tal_preds
from test_tal_helpers import make_rows, targets_from_rows

import jaxyolo
from jaxyolo.assign.tal import _topk_mask, resolve_batched
from jaxyolo.objectives.tal import TalLossConfig, _decode, assign_for_loss, yolov8_loss
from jaxyolo.objectives.yolox import YoloxLossConfig, yolox_loss

PATHS = (False, True)


def _assert_identical(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- YOLOX ---------------------------------------------------------------------------------------


def _yolox_step(config, batched):
    @jax.jit
    def step(preds, targets):
        def f(p):
            total, comps, assignment = yolox_loss(
                p, targets, strides=STRIDES, config=config, return_assignment=True, batched=batched
            )
            return total, (comps, assignment)

        return jax.value_and_grad(f, has_aux=True)(preds)

    return step


@pytest.mark.parametrize(
    "config",
    [YoloxLossConfig(), YoloxLossConfig(variant="main", strict_conflicts=True, use_l1=True)],
    ids=["0.3.0", "main-strict-l1"],
)
def test_yolox_paths_identical(rng, config):
    preds = [jnp.asarray(p) for p in make_preds(rng, 4, (96, 128), 5)]
    for targets in (make_targets(rng, [0, 3, 11, 1], 5, max_boxes=12), clustered_targets(rng, [6, 0, 9, 12], 5, max_boxes=12)):
        (total_map, (comps_map, asg_map)), grads_map = _yolox_step(config, False)(preds, targets)
        (total_vmap, (comps_vmap, asg_vmap)), grads_vmap = _yolox_step(config, True)(preds, targets)
        assert int(jnp.sum(asg_map.num_fg)) > 10 and float(total_map) > 0
        _assert_identical((total_map, comps_map, asg_map, grads_map), (total_vmap, comps_vmap, asg_vmap, grads_vmap))


# --- TAL (YOLOv8 / YOLOv9) -----------------------------------------------------------------------


def _tal_step(config, batched):
    @jax.jit
    def step(preds, targets):
        d = _decode(preds, STRIDES, config.reg_max, for_loss=True)
        assignment = assign_for_loss(d, targets, strides=STRIDES, config=config, batched=batched)
        vg = jax.value_and_grad(
            lambda p: yolov8_loss(p, targets, strides=STRIDES, config=config, batched=batched), has_aux=True
        )(preds)
        return vg, assignment

    return step


@pytest.mark.parametrize(
    "config",
    [TalLossConfig(), TalLossConfig(topk2=4), TalLossConfig(preset="yolov9"), TalLossConfig(preset="yolov9", topk=3)],
    ids=["ultralytics", "ultralytics-topk2", "yolov9", "yolov9-topk3"],
)
def test_tal_paths_identical(rng, config):
    preds = [jnp.asarray(p) for p in make_tal_preds(rng, 3, (128, 128), nc=4)]
    for kind, counts in (("random", [0, 7, 14]), ("overlap", [9, 3, 12]), ("tiny", [5, 0, 16])):
        targets = targets_from_rows(make_rows(rng, 3, counts, nc=4, kind=kind), 3, 16)
        ((total_a, comps_a), grads_a), asg_a = _tal_step(config, False)(preds, targets)
        ((total_b, comps_b), grads_b), asg_b = _tal_step(config, True)(preds, targets)
        assert int(jnp.sum(asg_a["fg_mask"])) > 10 and float(total_a) > 0
        _assert_identical((total_a, comps_a, grads_a, asg_a), (total_b, comps_b, grads_b, asg_b))


def test_topk_mask_paths_agree_on_ties(rng):
    """Many equal values (zeros, repeats): both take the lower index first, as lax.top_k."""
    metric = rng.integers(0, 4, (3, 5, 40)).astype(np.float32) / 4
    metric[0, 0] = 0.0  # all tied
    metric[1, 2, :3] = 0.0  # fewer entries than k
    for k in (1, 3, 10, 40, 50):
        cpu = np.asarray(_topk_mask(jnp.asarray(metric), k, batched=False))
        acc = np.asarray(_topk_mask(jnp.asarray(metric), k, batched=True))
        np.testing.assert_array_equal(cpu, acc)
        assert (cpu.sum(-1) == min(k, 40)).all()
    assert np.asarray(_topk_mask(jnp.zeros((1, 1, 6)), 2, batched=True))[0, 0].tolist() == [1, 1, 0, 0, 0, 0]


# --- dispatch --------------------------------------------------------------------------------------


def test_auto_follows_the_default_backend(monkeypatch, rng):
    """``batched=None`` resolves at trace time: the CPU path (a scan) on cpu, the vmap on gpu/tpu."""
    preds = [jnp.asarray(p) for p in make_preds(rng, 2, (64, 64), 3)]
    targets = make_targets(rng, [2, 5], 3, max_boxes=6)

    def primitives(**kw):
        jaxpr = jax.make_jaxpr(lambda p: yolox_loss(p, targets, strides=STRIDES, **kw)[0])(preds)
        return {str(e.primitive) for e in jaxpr.jaxpr.eqns}

    assert jax.default_backend() == "cpu" and resolve_batched(None) is False
    assert "scan" in primitives() and "scan" in primitives(batched=False) and "scan" not in primitives(batched=True)
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert resolve_batched(None) is True and resolve_batched(False) is False
        assert "scan" not in primitives() and "scan" in primitives(batched=False)
    with pytest.raises(TypeError, match="batched"):
        resolve_batched("yes")
    with pytest.raises(TypeError, match="batched"):
        yolov8_loss([jnp.asarray(p) for p in make_tal_preds(rng, 1, (64, 64), nc=2)],
                    targets_from_rows(make_rows(rng, 1, [1], nc=2), 1, 4), strides=STRIDES, batched=1)


@pytest.mark.parametrize("batched", PATHS)
@pytest.mark.parametrize("family", ["yolox", "yolov8", "yolov9"])
def test_no_retrace_across_box_counts(rng, family, batched):
    traces = []
    if family == "yolox":
        preds = [jnp.asarray(p) for p in make_preds(rng, 2, (64, 64), 3)]

        def loss(p, t):
            return yolox_loss(p, t, strides=STRIDES, batched=batched)[0]

        def targets_for(counts):
            return make_targets(rng, counts, 3, max_boxes=8)
    else:
        config = TalLossConfig(preset="ultralytics" if family == "yolov8" else "yolov9")
        preds = [jnp.asarray(p) for p in make_tal_preds(rng, 2, (64, 64), nc=3)]

        def loss(p, t):
            return yolov8_loss(p, t, strides=STRIDES, config=config, batched=batched)[0]

        def targets_for(counts):
            return targets_from_rows(make_rows(rng, 2, counts, nc=3), 2, 8)

    @jax.jit
    def step(p, t):
        traces.append(1)  # Python side effect: runs once per trace
        return jax.value_and_grad(loss)(p, t)

    for i in range(6):
        total, _ = step(preds, targets_for([i % 5, (3 * i) % 9]))
        assert np.isfinite(float(total))
    assert len(traces) == 1


def test_public_names():
    assert jaxyolo.yolox_loss is yolox_loss and jaxyolo.yolov8_loss is yolov8_loss
