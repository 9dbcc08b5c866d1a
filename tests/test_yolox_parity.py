"""jaxyolo.yolox_loss / simota vs yolox==0.3.0 ``YOLOXHead.get_losses`` and
``get_assignments``: total, components, gradients w.r.t. every level, fg masks,
matched GT indices and matched IoUs, with and without ``use_l1``.

Inputs are continuous random draws, so costs and dynamic-k IoU sums have no
float32 ties (near-integer sums are tested separately in test_yolox_simota.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from _strategies import gt_rows
from _yolox_cases import (
    MAX_BOXES,
    STRIDES,
    clustered_targets,
    make_preds,
    make_targets,
    tiny_and_huge_targets,
)
from conftest import GRAD_TOL, VALUE_TOL
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxyolo
from jaxyolo.targets import Targets

COMPONENTS = ("iou", "obj", "cls", "l1", "num_fg_per_gt")


@functools.cache
def loss_and_grad(use_l1: bool, strict: bool = False):
    """One jitted value_and_grad per config (shapes are reused across cases)."""
    config = jaxyolo.YoloxLossConfig(use_l1=use_l1, strict_conflicts=strict)

    @jax.jit
    def f(preds, targets):
        def loss(p):
            total, comps, assignment = jaxyolo.yolox_loss(
                p, targets, strides=STRIDES, config=config, return_assignment=True
            )
            return total, (comps, assignment)

        (total, (comps, assignment)), grads = jax.value_and_grad(loss, has_aux=True)(preds)
        return total, comps, assignment, grads

    return f


def check_parity(oracles, preds, targets, *, use_l1, image_size=None):
    """Assert parity of everything; return the measured max errors."""
    from jaxyolo.testing.oracles import yolox as oyolox

    total, comps, assignment, grads = loss_and_grad(use_l1)(preds, targets)
    ref = oyolox.yolox_get_losses(preds, targets, strides=STRIDES, use_l1=use_l1, image_size=image_size)
    np.testing.assert_allclose(float(total), ref["total"], **VALUE_TOL)
    for name in COMPONENTS:
        np.testing.assert_allclose(float(comps[name]), ref[name], **VALUE_TOL, err_msg=name)
    for level, (g, r) in enumerate(zip(grads, ref["grads"])):
        np.testing.assert_allclose(np.asarray(g), r, **GRAD_TOL, err_msg=f"grad level {level}")

    ref_a = oyolox.yolox_get_assignments(preds, targets, strides=STRIDES, image_size=image_size)
    np.testing.assert_array_equal(np.asarray(assignment.fg_mask), ref_a["fg_mask"])
    np.testing.assert_array_equal(np.asarray(assignment.matched_gt), ref_a["matched_gt"])
    np.testing.assert_allclose(np.asarray(assignment.matched_iou), ref_a["matched_iou"], **VALUE_TOL)
    np.testing.assert_array_equal(np.asarray(assignment.num_fg), ref_a["num_fg"])
    return total, comps, assignment


@pytest.mark.parametrize("use_l1", [False, True])
def test_random_batch_square(oracles, use_l1):
    rng = np.random.default_rng(4)
    preds = make_preds(rng, 4, (128, 128), 5)
    targets = make_targets(rng, [0, 3, 17, 30], 5)
    _, comps, assignment = check_parity(oracles, preds, targets, use_l1=use_l1)
    num_fg = np.asarray(assignment.num_fg)
    assert num_fg[0] == 0 and (num_fg[1:] > 0).all()  # the GT-free image has no positives
    assert float(comps["l1"]) > 0 if use_l1 else float(comps["l1"]) == 0.0


@pytest.mark.parametrize("use_l1", [False, True])
def test_random_batch_non_square_nc1(oracles, use_l1):
    rng = np.random.default_rng(5)
    preds = make_preds(rng, 4, (96, 160), 1)
    targets = make_targets(rng, [5, 0, 12, 30], 1)
    check_parity(oracles, preds, targets, use_l1=use_l1)


def test_batch_without_gts(oracles):
    rng = np.random.default_rng(6)
    preds = make_preds(rng, 4, (128, 128), 5)
    targets = make_targets(rng, [0, 0, 0, 0], 5)
    total, comps, assignment = check_parity(oracles, preds, targets, use_l1=True)
    assert int(np.asarray(assignment.num_fg).sum()) == 0
    assert float(comps["iou"]) == float(comps["cls"]) == float(comps["l1"]) == 0.0
    assert np.isfinite(float(total))


@pytest.mark.parametrize("use_l1", [False, True])
def test_competing_overlapping_gts(oracles, use_l1):
    rng = np.random.default_rng(7)
    preds = make_preds(rng, 4, (128, 128), 5)
    targets = clustered_targets(rng, [8, 20, 30, 2], 5)
    _, _, assignment = check_parity(oracles, preds, targets, use_l1=use_l1)
    assert int(np.asarray(assignment.num_conflicts).sum()) > 0  # conflicts really happened


@pytest.mark.parametrize("use_l1", [False, True])
def test_tiny_and_image_sized_boxes(oracles, use_l1):
    rng = np.random.default_rng(8)
    preds = make_preds(rng, 4, (128, 128), 5)
    targets = tiny_and_huge_targets(rng, [6, 9, 0, 30], 5, (128, 128))
    check_parity(oracles, preds, targets, use_l1=use_l1)


def test_eager_path_matches_jit_and_oracle(oracles):
    """The non-jitted call gives the same numbers (and passes the same checks)."""
    from jaxyolo.testing.oracles import yolox as oyolox

    rng = np.random.default_rng(9)
    preds = make_preds(rng, 2, (64, 96), 3)
    targets = make_targets(rng, [4, 7], 3, max_boxes=8)
    (total, comps), grads = jax.value_and_grad(
        lambda p: jaxyolo.yolox_loss(p, targets, strides=STRIDES), has_aux=True
    )(preds)
    ref = oyolox.yolox_get_losses(preds, targets, strides=STRIDES)
    np.testing.assert_allclose(float(total), ref["total"], **VALUE_TOL)
    for name in COMPONENTS:
        np.testing.assert_allclose(float(comps[name]), ref[name], **VALUE_TOL, err_msg=name)
    for g, r in zip(grads, ref["grads"]):
        np.testing.assert_allclose(np.asarray(g), r, **GRAD_TOL)


_HYP_SHAPE = dict(batch=2, img=(64, 64), nc=3, max_boxes=8)


@settings(max_examples=8)
@given(
    rows=gt_rows(batch=_HYP_SHAPE["batch"], max_count=_HYP_SHAPE["max_boxes"], img_hw=_HYP_SHAPE["img"],
                 nc=_HYP_SHAPE["nc"], strides=STRIDES),
    seed=st.integers(0, 2**31 - 1),
    use_l1=st.booleans(),
)
def test_property_parity_small(oracles, rows, seed, use_l1):
    """Drawn small batches (one compiled shape) agree with the oracle: GT edges on anchor
    centres and GT centres on stride multiples put anchors exactly on the borders of the
    in-box and centre-region tests (both strict ``> 0``)."""
    preds = make_preds(np.random.default_rng(seed), _HYP_SHAPE["batch"], _HYP_SHAPE["img"], _HYP_SHAPE["nc"])
    targets = Targets.from_rows(rows, _HYP_SHAPE["batch"], _HYP_SHAPE["max_boxes"])
    check_parity(oracles, preds, targets, use_l1=use_l1)


def test_non_contiguous_mask_matches_compacted(oracles):
    """Real rows need not come first: slot order is kept, upstream indices map back."""
    rng = np.random.default_rng(10)
    preds = make_preds(rng, 2, (128, 128), 5)
    targets = make_targets(rng, [6, 3], 5)
    perm = np.arange(MAX_BOXES)[::-1]  # real rows at the end, reversed
    shuffled = Targets(targets.boxes[:, perm], targets.classes[:, perm], targets.mask[:, perm])
    t1, c1, a1, g1 = loss_and_grad(False)(preds, targets)
    t2, c2, a2, g2 = loss_and_grad(False)(preds, shuffled)
    # Reversing GT order only relabels the GTs (no ties), so everything agrees.
    np.testing.assert_allclose(float(t1), float(t2), **VALUE_TOL)
    np.testing.assert_array_equal(np.asarray(a1.fg_mask), np.asarray(a2.fg_mask))
    m1, m2 = np.asarray(a1.matched_gt), np.asarray(a2.matched_gt)
    np.testing.assert_array_equal(np.where(m1 >= 0, MAX_BOXES - 1 - m1, -1), m2)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **GRAD_TOL)
