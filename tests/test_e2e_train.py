"""End-to-end models (YOLO26, YOLOv10) in the trainer: the ``"e2e"`` objective
and its per-epoch one-to-many weight, the configuration rules, and the
detections of a session (one-to-one top-k, or ``nms=True``: one-to-many + NMS).
The architectures' and the loss's parity with upstream are in
``test_arch_parity.py`` and ``test_e2e.py``; training that learns in
``test_learning.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_tal_helpers import make_preds, make_rows, targets_from_rows

import jaxyolo
from jaxyolo.evaluate import batched_nms, end2end_topk
from jaxyolo.train import Session, TrainConfig
from jaxyolo.train.step import log_names, make_objective

STRIDES = (8, 16, 32)


def _case(rng, *, reg_max, nc=3, batch=2, hw=(64, 96)):
    preds = {k: [jnp.asarray(p) for p in make_preds(rng, batch, hw, nc=nc, reg_max=max(reg_max, 2))] for k in ("one2many", "one2one")}
    if reg_max == 1:  # ltrb distances in grid units instead of DFL logits
        preds = {k: [jnp.concatenate([jnp.abs(p[..., :4]) + 0.5, p[..., -nc:]], -1) for p in v] for k, v in preds.items()}
    targets = targets_from_rows(make_rows(rng, batch, 3, nc=nc), batch, 8)
    return preds, targets


@pytest.mark.parametrize("model,reg_max,item", [("yolo26n", 1, "l1"), ("yolov10n", 16, "dfl")])
def test_objective_weights_the_branches_by_the_epoch(rng, model, reg_max, item):
    """``make_objective`` for ``loss="e2e"``: ``e2e_loss`` with ``e2e_o2m_weight(epoch,
    epochs)``, times ``nbs / B``; the epoch is traced (one compile for every epoch)."""
    cfg = TrainConfig(model=model, epochs=5)
    assert cfg.loss == "e2e"
    assert log_names("e2e", reg_max) == ("loss", "box", "cls", item, "lr", "grad_norm", "boxes_cut")
    f = make_objective(cfg, strides=STRIDES, nc=3, reg_max=reg_max)
    preds, targets = _case(rng, reg_max=reg_max)
    traces = []

    def run(p, t, e):
        traces.append(1)
        return f(p, t, epoch=e)

    jitted = jax.jit(run)
    e2e = jaxyolo.E2ELossConfig(reg_max=reg_max)
    seen = set()
    for epoch in (0, 2, 4):
        obj, logs = jitted(preds, targets, jnp.int32(epoch))
        o2m = jaxyolo.e2e_o2m_weight(epoch, 5)
        total, items = jaxyolo.e2e_loss(preds["one2many"], preds["one2one"], targets, o2m_weight=o2m, strides=STRIDES, config=e2e)
        np.testing.assert_allclose(float(obj), float(total) * cfg.nbs / 2, rtol=1e-6)
        np.testing.assert_allclose(float(logs["loss"]), float(total) / 2, rtol=1e-6)
        assert set(logs) == {"loss", "box", "cls", item}
        np.testing.assert_allclose(float(logs[item]), float(items[item]), rtol=1e-6)
        seen.add(round(float(obj), 3))
    assert len(traces) == 1 and len(seen) == 3  # 0.8, 0.45, 0.1: three different totals, one compile


def test_config_rules():
    assert TrainConfig(model="yolo26n").loss == TrainConfig(model="yolov10s").loss == "e2e"
    with pytest.raises(ValueError, match="loss='e2e' needs an end-to-end architecture.*model='pico'"):
        TrainConfig(model="pico", loss="e2e")
    with pytest.raises(ValueError, match="loss='yolov8' does not fit model='yolo26n', whose loss is 'e2e'"):
        TrainConfig(model="yolo26n", loss="yolov8")
    assert TrainConfig.from_json({**TrainConfig(model="yolo26n").to_json(), "nms": True}).nms is True


@pytest.mark.parametrize("nms", [False, True])
def test_session_detections(rng, nms):
    """A YOLO26n session's ``detect``: the one-to-one branch's top-k (no NMS), or
    with ``config.nms`` the one-to-many branch through NMS, on the same forward."""
    cfg = TrainConfig(model="yolo26n", img_size=64, batch=2, max_boxes=8, nms=nms)
    session = Session(cfg, nc=3, steps_per_epoch=1)
    assert session.end2end is not nms
    params, stats = session.state["params"], session.state["stats"]
    images = jnp.asarray(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    kw = dict(conf_thres=0.001, iou_thres=0.7, max_det=20)
    got = jax.jit(lambda p, s, im: session.detect(p, s, im, **kw))(params, stats, images)

    model = nnx.merge(session.graph_eval, params, stats)
    preds = model(images.astype(jnp.float32) / 255)
    if nms:
        want = batched_nms(*model.decode(preds, one2many=True), **kw)
    else:
        want = end2end_topk(*model.decode(preds), conf_thres=kw["conf_thres"], max_det=kw["max_det"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4)
    assert bool(np.asarray(got[3]).any())  # at random init some scores pass 0.001


def test_end2end_topk_pads_and_thresholds():
    """Fewer anchors than ``max_det``: padded invalid rows; a score must exceed ``conf_thres``."""
    boxes = jnp.arange(3 * 4, dtype=jnp.float32).reshape(1, 3, 4)
    scores = jnp.asarray([[[0.1, 0.9], [0.5, 0.2], [0.05, 0.3]]])
    b, s, c, v, n = end2end_topk(boxes, scores, conf_thres=0.2, max_det=5, with_count=True)
    assert b.shape == (1, 5, 4) and s.shape == c.shape == v.shape == (1, 5)
    # anchors by best score: 0 (0.9), 1 (0.5), 2 (0.3); their 6 scores' top 3: 0.9 (a0 c1), 0.5 (a1 c0), 0.3 (a2 c1)
    np.testing.assert_allclose(np.asarray(s[0]), [0.9, 0.5, 0.3, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(c[0]), [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(b[0, :3]), np.asarray(boxes[0]))
    np.testing.assert_array_equal(np.asarray(v[0]), [True, True, True, False, False])
    assert int(n[0]) == 3
    _, s2, _, v2 = end2end_topk(boxes, scores, conf_thres=0.4, max_det=2)
    np.testing.assert_array_equal(np.asarray(v2[0]), [True, True])
    _, s3, _, v3 = end2end_topk(boxes, scores, conf_thres=0.6, max_det=2)
    np.testing.assert_array_equal(np.asarray(v3[0]), [True, False])
    assert float(s3[0, 1]) == 0.0
    with pytest.raises(ValueError, match="max_det must be a positive int"):
        end2end_topk(boxes, scores, max_det=0)
    with pytest.raises(ValueError, match=r"scores must be \(B, A, nc\)"):
        end2end_topk(boxes, scores[:, :2])


def test_cli_nms_flags():
    from jaxyolo.cli import build_parser

    p = build_parser()
    assert p.parse_args(["train", "--model", "yolo26n", "--nms"]).nms is True
    assert p.parse_args(["eval", "--checkpoint", "x"]).nms is None
    assert p.parse_args(["eval", "--checkpoint", "x", "--no-nms"]).nms is False
    assert p.parse_args(["predict", "im.png", "--checkpoint", "x", "--nms"]).nms is True
    assert p.parse_args(["train", "--loss", "e2e", "--model", "yolov10n"]).loss == "e2e"
