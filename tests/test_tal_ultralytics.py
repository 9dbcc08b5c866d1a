"""Parity of ``jaxyolo.yolov8_loss`` (preset "ultralytics") and its assigner with
ultralytics 8.4.190 ``v8DetectionLoss``: total, components, gradients w.r.t.
every level, and the assigner outputs.

Inputs have continuous random logits, so no two anchors tie on a positive
alignment metric; the foreground is compared where the alignment is > 0.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _strategies import gt_rows
from conftest import GRAD_TOL, VALUE_TOL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tal_helpers import compare, jitted_assign, jitted_loss, make_preds, make_rows, run_jax, targets_from_rows

from jaxyolo import TalLossConfig

STRIDES = (8, 16, 32)


def _case(oracles, rng, *, batch=4, hw=(128, 128), nc=3, reg_max=16, counts=None, kind="random", config=None,
          max_boxes=32, size=(0.04, 0.6), rows=None, **oracle_kw):
    config = config or TalLossConfig(reg_max=reg_max)
    counts = rng.integers(0, 31, batch) if counts is None else counts
    preds = make_preds(rng, batch, hw, nc=nc, reg_max=reg_max)
    if rows is None:
        rows = make_rows(rng, batch, counts, nc=nc, kind=kind, size=size)
    targets = targets_from_rows(rows, batch, max_boxes)
    ref = oracles.v8_detection_loss(
        preds, targets, strides=STRIDES, nc=nc, reg_max=reg_max, box=config.box, cls=config.cls, dfl=config.dfl,
        topk=config.topk, topk2=config.topk2, class_weights=config.class_weights, **oracle_kw
    )
    ours = run_jax(preds, targets, strides=STRIDES, config=config)
    compare(ours, ref, VALUE_TOL, GRAD_TOL)
    return ours, ref


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_0_to_30_gts(oracles, seed):
    ours, ref = _case(oracles, np.random.default_rng(seed))
    assert ref["assign"]["fg_mask"].sum() > 0


def test_empty_image_and_empty_batch(oracles, rng):
    _case(oracles, rng, counts=[0, 5, 0, 12])
    ours, ref = _case(oracles, rng, counts=[0, 0, 0, 0])
    assert ours["components"][0] == 0 and ours["components"][2] == 0
    assert not ours["assign"]["fg_mask"].any()


def test_tiny_gts_enlarged_to_stride(oracles, rng):
    # sides < 16 px: ultralytics enlarges them to strides[1] for the in-GT test
    ours, ref = _case(oracles, rng, counts=[6, 10, 3, 8], kind="tiny")
    assert ref["assign"]["fg_mask"].sum() > 0


def test_overlapping_gts_compete_for_anchors(oracles, rng):
    ours, ref = _case(oracles, rng, counts=[8, 12, 20, 30], kind="overlap", size=(0.2, 0.6))
    # anchors inside several GTs exist and were resolved
    in_several = (ref["assign"]["align_metric"] > 0).sum(1) > 1
    assert in_several.any()


def test_border_boxes(oracles, rng):
    _case(oracles, rng, counts=[4, 8, 5, 7], kind="border")


def test_non_square_320x480(oracles, rng):
    _case(oracles, rng, batch=2, hw=(320, 480), counts=[15, 25])


def test_nc_1(oracles, rng):
    _case(oracles, rng, nc=1)


def test_reg_max_8(oracles, rng):
    _case(oracles, rng, reg_max=8, config=TalLossConfig(reg_max=8))


@pytest.mark.parametrize("nc, reg_max", [(16, 16), (80, 16), (8, 8)])
def test_channels_divisible_by_reg_max(oracles, rng, nc, reg_max):
    # 4*reg_max + nc divisible by reg_max: the level gradient is written as (G, reg_max) channel groups
    # (the other tests, nc = 1 or 3, take the plain concatenation)
    _case(oracles, rng, nc=nc, reg_max=reg_max, config=TalLossConfig(reg_max=reg_max), counts=[12, 0, 25, 7])
    cw = tuple(float(w) for w in rng.uniform(0.2, 2.0, nc))
    _case(oracles, rng, nc=nc, reg_max=reg_max, config=TalLossConfig(reg_max=reg_max, class_weights=cw),
          counts=[3, 9, 30, 1])


def test_topk2_gains_and_class_weights(oracles, rng):
    cfg = TalLossConfig(topk=10, topk2=5, box=5.0, cls=1.0, dfl=2.0, class_weights=(0.5, 1.0, 2.0))
    _case(oracles, rng, config=cfg, counts=[10, 20, 5, 0])


def test_reg_max_1_l1_branch(oracles, rng):
    """``reg_max = 1`` (YOLO26's DFL-free head): the box channels are ltrb distances in grid
    units (drawn over [0.2, 5]), the third term is upstream's L1 (``l1_loss``); with topk2,
    gains and class weights."""
    cfg = TalLossConfig(reg_max=1, topk2=4, box=5.0, cls=1.0, dfl=2.0, class_weights=(0.5, 1.0, 2.0))
    preds = [np.concatenate([rng.uniform(0.2, 5.0, p.shape[:3] + (4,)), p[..., 8:]], -1).astype(np.float32)
             for p in make_preds(rng, 4, (128, 96), nc=3, reg_max=2)]
    targets = targets_from_rows(make_rows(rng, 4, [0, 5, 30, 12], nc=3), 4, 32)
    ref = oracles.v8_detection_loss(preds, targets, strides=STRIDES, nc=3, reg_max=1, box=5.0, cls=1.0, dfl=2.0,
                                    topk=10, topk2=4, class_weights=cfg.class_weights)
    jp = [jnp.asarray(p) for p in preds]
    (total, comp), grads = jitted_loss(STRIDES, cfg)(jp, targets)
    assert set(comp) == {"box", "cls", "l1"}
    ours = dict(total=float(total), components=np.array([float(comp[k]) for k in ("box", "cls", "l1")]),
                grads=[np.asarray(g) for g in grads], assign=jax.tree.map(np.asarray, jitted_assign(STRIDES, cfg)(jp, targets)._asdict()))
    compare(ours, ref, VALUE_TOL, GRAD_TOL)
    assert ref["assign"]["fg_mask"].sum() > 0


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gt_rows(batch=2, max_count=12, img_hw=(64, 128), nc=3, strides=STRIDES, sides=(STRIDES[1],)),
       st.integers(0, 2**31 - 1))
def test_hypothesis_parity(oracles, rows, seed):
    """Drawn GTs: edges on anchor centres (the strict in-GT test), sides equal to the
    enlargement threshold strides[1], boxes on the image border, 1-px boxes."""
    _case(oracles, np.random.default_rng(seed), batch=2, hw=(64, 128), rows=rows, max_boxes=16)
