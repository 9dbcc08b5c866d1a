"""The two assignment paths of the losses (``batched=``): the accelerator path
(``True``: SimOTA vmapped over images; TAL's top-k by rounds of row maxima) and
the CPU path (``False``: SimOTA under ``lax.map``; ``lax.top_k`` + scatter) agree
on the CPU, neither retraces across box counts, and ``None`` picks one from
``jax.default_backend()`` at trace time.

TAL: the two paths are bit-identical (values, gradients, assignments).  YOLOX:
the assignment's discrete part (positives, matched GT, counts) is identical,
but the float32 IoU that XLA computes for a matched pair can differ by one ulp
between the vmapped and the per-image program (seen at one anchor of one seed
in a dozen batches), and the class target and its gradient with it: those are
compared to a few ulp.
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

ULPS = dict(rtol=4e-7, atol=1e-9)  # a few float32 ulps


def _assert_identical(a, b, **tol):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if tol and np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


def _counted(fn):
    """``jax.jit(fn)`` and the list its traces append to (one entry per trace)."""
    traces = []

    def traced(*args):
        traces.append(1)  # Python side effect: runs once per trace
        return fn(*args)

    return jax.jit(traced), traces


# --- YOLOX ---------------------------------------------------------------------------------------


def _yolox_step(config, batched):
    def step(preds, targets):
        def f(p):
            total, comps, assignment = yolox_loss(
                p, targets, strides=STRIDES, config=config, return_assignment=True, batched=batched
            )
            return total, (comps, assignment)

        return jax.value_and_grad(f, has_aux=True)(preds)

    return _counted(step)


@pytest.mark.parametrize(
    "config",
    [YoloxLossConfig(), YoloxLossConfig(variant="main", strict_conflicts=True, use_l1=True)],
    ids=["0.3.0", "main-strict-l1"],
)
def test_yolox_paths_agree_without_retrace(config):
    rng = np.random.default_rng(2)  # this seed has a one-ulp matched IoU difference
    preds = [jnp.asarray(p) for p in make_preds(rng, 4, (96, 128), 5)]
    (cpu, cpu_traces), (acc, acc_traces) = _yolox_step(config, False), _yolox_step(config, True)
    for targets in (
        make_targets(rng, [0, 3, 11, 1], 5, max_boxes=12),
        clustered_targets(rng, [6, 0, 9, 12], 5, max_boxes=12),
        make_targets(rng, [0, 0, 0, 0], 5, max_boxes=12),
    ):
        (total_c, (comps_c, asg_c)), grads_c = cpu(preds, targets)
        (total_a, (comps_a, asg_a)), grads_a = acc(preds, targets)
        if int(jnp.sum(targets.mask)):
            assert int(jnp.sum(asg_c.num_fg)) > 10
        assert float(total_c) > 0
        discrete = ("fg_mask", "matched_gt", "num_fg", "num_conflicts")
        _assert_identical([getattr(asg_c, k) for k in discrete], [getattr(asg_a, k) for k in discrete])
        _assert_identical((total_c, comps_c, asg_c.matched_iou, grads_c), (total_a, comps_a, asg_a.matched_iou, grads_a),
                          **ULPS)
    assert (len(cpu_traces), len(acc_traces)) == (1, 1)


# --- TAL (YOLOv8 / YOLOv9) -----------------------------------------------------------------------


def _tal_step(config, batched):
    def step(preds, targets):
        d = _decode(preds, STRIDES, config.reg_max, for_loss=True)
        assignment = assign_for_loss(d, targets, strides=STRIDES, config=config, batched=batched)
        vg = jax.value_and_grad(
            lambda p: yolov8_loss(p, targets, strides=STRIDES, config=config, batched=batched), has_aux=True
        )(preds)
        return vg, assignment

    return _counted(step)


@pytest.mark.parametrize(
    "config", [TalLossConfig(topk2=4), TalLossConfig(preset="yolov9")], ids=["ultralytics-topk2", "yolov9"]
)
def test_tal_paths_identical_without_retrace(rng, config):
    preds = [jnp.asarray(p) for p in make_tal_preds(rng, 3, (128, 128), nc=4)]
    (cpu, cpu_traces), (acc, acc_traces) = _tal_step(config, False), _tal_step(config, True)
    for kind, counts in (("random", [0, 7, 14]), ("overlap", [9, 3, 12]), ("tiny", [5, 0, 16]), ("random", [0, 0, 0])):
        targets = targets_from_rows(make_rows(rng, 3, counts, nc=4, kind=kind), 3, 16)
        ((total_c, comps_c), grads_c), asg_c = cpu(preds, targets)
        ((total_a, comps_a), grads_a), asg_a = acc(preds, targets)
        if sum(counts):
            assert int(jnp.sum(asg_c["fg_mask"])) > 10 and float(total_c) > 0
        _assert_identical((total_c, comps_c, grads_c, asg_c), (total_a, comps_a, grads_a, asg_a))
    assert (len(cpu_traces), len(acc_traces)) == (1, 1)


def test_topk_mask_paths_agree_on_ties(rng):
    """Many equal values (zeros, repeats): both take the lower index first, as lax.top_k."""
    metric = rng.integers(0, 4, (3, 5, 40)).astype(np.float32) / 4
    metric[0, 0] = 0.0  # all tied
    metric[1, 2, :3] = 0.0
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


def test_public_names():
    assert jaxyolo.yolox_loss is yolox_loss and jaxyolo.yolov8_loss is yolov8_loss
