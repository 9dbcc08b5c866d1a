"""Parity of ``jaxyolo.yolov8_loss(config=TalLossConfig(preset="yolov9"))`` and the
"yolov9" assigner preset with YOLOv9's own ``utils/loss_tal.py`` ``ComputeLoss``
and ``utils/tal/assigner.py`` (yolo9==1.0.18, through
``jaxyolo.testing.oracles.yolov9``), and the places where the presets differ.

Inputs have continuous random logits (no ties on positive alignment metrics);
the foreground is compared where the alignment is > 0.
"""


import numpy as np
import pytest
from conftest import GRAD_TOL, VALUE_TOL
from test_tal_helpers import compare, make_preds, make_rows, run_jax, targets_from_rows

from jaxyolo import TalLossConfig
from jaxyolo.assign.tal import task_aligned_details

STRIDES = (8, 16, 32)


def _case(oracles, rng, *, batch=4, hw=(128, 128), nc=3, reg_max=16, counts=None, kind="random", config=None,
          size=(0.04, 0.6)):
    config = config or TalLossConfig(preset="yolov9", reg_max=reg_max)
    counts = rng.integers(0, 31, batch) if counts is None else counts
    preds = make_preds(rng, batch, hw, nc=nc, reg_max=reg_max)
    rows = make_rows(rng, batch, counts, nc=nc, kind=kind, size=size)
    targets = targets_from_rows(rows, batch, 32)
    ref = oracles.yolov9_loss(
        preds, targets, strides=STRIDES, nc=nc, reg_max=reg_max, topk=config.topk, alpha=config.alpha,
        beta=config.beta, cls_pw=config.cls_pw, fl_gamma=config.fl_gamma, cls_loss=config.cls_loss,
    )
    ours = run_jax(preds, targets, strides=STRIDES, config=config)
    compare(ours, ref, VALUE_TOL, GRAD_TOL)
    return ours, ref, preds, targets


@pytest.mark.parametrize("seed", range(3))
def test_random_batches_0_to_30_gts(oracles, seed):
    ours, ref, *_ = _case(oracles, np.random.default_rng(100 + seed))
    assert ref["assign"]["fg_mask"].sum() > 0


def test_empty_image_and_empty_batch(oracles, rng):
    _case(oracles, rng, counts=[0, 7, 0, 3])
    ours, ref, *_ = _case(oracles, rng, counts=[0, 0, 0, 0])
    assert not ours["assign"]["fg_mask"].any()


def test_tiny_gts(oracles, rng):
    _case(oracles, rng, counts=[6, 10, 3, 8], kind="tiny")


def test_overlapping_gts_dense_argmax(oracles, rng):
    _case(oracles, rng, counts=[8, 12, 20, 30], kind="overlap", size=(0.2, 0.6))


def test_border_nonsquare_nc1(oracles, rng):
    _case(oracles, rng, batch=2, hw=(320, 480), nc=1, counts=[9, 14], kind="border")


def test_reg_max_8(oracles, rng):
    _case(oracles, rng, reg_max=8, config=TalLossConfig(preset="yolov9", reg_max=8))


@pytest.mark.parametrize("config", [
    TalLossConfig(preset="yolov9"),
    TalLossConfig(preset="yolov9", cls_pw=2.0, fl_gamma=1.5),
], ids=["bce", "cls_pw_focal"])
def test_channels_divisible_by_reg_max(oracles, rng, config):
    # 4*reg_max + nc divisible by reg_max: the grouped-channel gradient, with the fused BCE and
    # with a class loss added by autodiff on top of it
    _case(oracles, rng, nc=16, config=config, counts=[12, 0, 25, 7])


def test_cls_pw_and_focal(oracles, rng):
    _case(oracles, rng, config=TalLossConfig(preset="yolov9", cls_pw=2.0, fl_gamma=1.5), counts=[5, 9, 0, 12])


def test_varifocal_way(oracles, rng):
    # VFL's one-hot label marks every foreground anchor, including zero-metric top-k picks whose
    # order is implementation-defined; large GTs hold >= topk positive candidates, so none occur.
    ours, ref, *_ = _case(oracles, rng, config=TalLossConfig(preset="yolov9", cls_loss="varifocal"),
                          counts=[5, 9, 0, 12], size=(0.35, 0.7))
    ra = ref["assign"]
    assert not (ra["mask_pos"] & (ra["align_metric"] <= 0)).any()


def test_presets_differ_on_tiny_gts(rng):
    """Tiny GTs: ultralytics enlarges them to strides[1] for the in-GT test, so it
    finds candidate anchors YOLOv9 does not; the two losses differ there."""
    preds = make_preds(rng, 2, (128, 128), nc=3)
    rows = make_rows(rng, 2, [8, 8], nc=3, kind="tiny")
    targets = targets_from_rows(rows, 2, 16)
    v8 = run_jax(preds, targets, config=TalLossConfig())
    v9 = run_jax(preds, targets, config=TalLossConfig(preset="yolov9"))
    assert v8["assign"]["fg_mask"].sum() > v9["assign"]["fg_mask"].sum()
    assert abs(v8["components"][0] - v9["components"][0]) > 1e-3 * v8["components"][0]  # box term


def test_assigner_on_degenerate_boxes(oracles, rng):
    """The preset's CIoU is YOLOv9's ``bbox_iou`` (``h + eps``), not yolov5's (``clamp(h, eps)``):
    on flat, point-like and sub-eps GT and predicted boxes the dense overlaps, the align metric
    and the assignment equal upstream ``TaskAlignedAssigner``'s.

    Every anchor inside a GT predicts a jittered copy of the first such GT (positive metric,
    so top-1 has no zero ties); the other anchors predict the degenerate GTs themselves and
    zero-height boxes, which only the sub-eps arithmetic scores."""
    anchors = np.stack(np.meshgrid(np.arange(4) * 8 + 4.0, np.arange(4) * 8 + 4.0), -1).reshape(16, 2)
    gt = np.array([
        [[2, 2, 14, 9], [0, 0, 10, 1e-9], [5, 5, 5, 5], [0, 0, 3e-8, 6e-8], [9, 3, 30, 25], [1, 20, 25, 20 + 5e-8]],
        [[3, 3, 28, 28], [0, 0, 1e-9, 1e-9], [12, 0, 20, 0], [6, 6, 7, 6 + 1e-8], [0, 0, 0, 0], [0, 0, 0, 0]],
    ])
    mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
    degenerate = [[0, 0, 10, 1e-9], [5, 5, 5, 5], [0, 0, 3e-8, 6e-8], [0, 0, 1e-9, 1e-9], [12, 0, 20, 0],
                  [6, 6, 7, 6 + 1e-8], [1, 20, 25, 20], [0, 0, 2, 1e-9]]
    pd = np.zeros((2, 16, 4))
    for b in range(2):
        free = 0
        for a, (x, y) in enumerate(anchors):
            inside = mask[b] & (gt[b, :, 0] < x) & (x < gt[b, :, 2]) & (gt[b, :, 1] < y) & (y < gt[b, :, 3])
            if inside.any():
                pd[b, a] = gt[b, np.argmax(inside)] + rng.uniform(-1, 1, 4)
            else:
                pd[b, a], free = degenerate[free % len(degenerate)], free + 1
    pd, gt, anchors = pd.astype(np.float32), gt.astype(np.float32), anchors.astype(np.float32)
    labels = rng.integers(0, 3, (2, 6))
    scores = rng.uniform(0.05, 0.95, (2, 16, 3)).astype(np.float32)
    ref = oracles.yolov9_assign(scores, pd, anchors, labels, gt, mask, nc=3, topk=1)
    ours = task_aligned_details(scores, pd, anchors, labels, gt, mask, preset="yolov9", topk=1)
    ours = {k: np.asarray(v) for k, v in ours._asdict().items()}
    np.testing.assert_allclose(ours["overlaps"], ref["overlaps"], **VALUE_TOL)
    np.testing.assert_allclose(ours["align_metric"], ref["align_metric"], rtol=1e-5, atol=1e-12)
    flat = np.abs(gt[..., 3] - gt[..., 1]) < 1e-7  # (2, 6) GTs with height below eps
    assert (ref["overlaps"][flat] > 1e-3).any()  # the sub-eps arithmetic is exercised
    assert ref["fg_mask"].sum() >= 3
    np.testing.assert_array_equal(ours["mask_pos"], ref["mask_pos"])
    np.testing.assert_array_equal(ours["fg_mask"], ref["fg_mask"])
    np.testing.assert_allclose(ours["target_scores"], ref["target_scores"], **VALUE_TOL)
