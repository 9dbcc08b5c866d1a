"""Models: output layouts per head, upstream bias inits, decoding, BatchNorm modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxyolo.models.layers import ConvBnAct
from jaxyolo.models import (
    MODEL_SIZES,
    YOLOV5S_ANCHORS,
    Backbone,
    Detector,
    Yolov8Head,
    build_detector,
    decode_yolov5,
    decode_yolov8,
    decode_yolox,
)

NC = 6


@nnx.jit
def _forward_backbone(backbone, x):
    return backbone(x)


@pytest.fixture(scope="module")
def models():
    return {h: build_detector(h, nc=NC, size="pico", seed=0) for h in ("yolov8", "yolov5", "yolox")}


def test_output_layouts_match_the_losses(models):
    x = jnp.zeros((2, 64, 96, 3))
    feats = _forward_backbone(models["yolov8"].backbone, x)  # the three share the backbone layout
    assert [tuple(f.shape) for f in feats] == [(2, 8, 12, 32), (2, 4, 6, 64), (2, 2, 3, 128)]
    out = {h: m.head(feats) for h, m in models.items()}
    shapes = {h: [tuple(o.shape) for o in out[h]] for h in models}
    grids = [(8, 12), (4, 6), (2, 3)]
    assert shapes["yolov8"] == [(2, h, w, 4 * 16 + NC) for h, w in grids]
    assert shapes["yolov5"] == [(2, h, w, 3, 5 + NC) for h, w in grids]
    assert shapes["yolox"] == [(2, h, w, 5 + NC) for h, w in grids]
    for h, m in models.items():
        boxes, scores = m.decode(out[h])
        a = sum(gh * gw for gh, gw in grids) * (3 if h == "yolov5" else 1)
        assert boxes.shape == (2, a, 4) and scores.shape == (2, a, NC)
        assert np.all(np.isfinite(boxes)) and np.all((scores >= 0) & (scores <= 1))


def test_yolov5_bias_init_as_upstream(models):
    head = models["yolov5"].head
    for conv, s in zip(head.m, (8, 16, 32)):
        b = np.asarray(conv.bias[...]).reshape(3, 5 + NC)
        bound = 1 / math.sqrt(conv.in_features)  # torch default init underneath
        obj_shift = math.log(8 / (640 / s) ** 2)
        cls_shift = math.log(0.6 / (NC - 0.99999))
        assert np.all(np.abs(b[:, 4] - obj_shift) <= bound + 1e-6)
        assert np.all(np.abs(b[:, 5:] - cls_shift) <= bound + 1e-6)
        assert np.all(np.abs(b[:, :4]) <= bound + 1e-6)
    # Biases are not all equal: the upstream shift is added to a random init.
    assert np.std(np.asarray(head.m[0].bias[...])) > 0


def test_yolox_bias_init_as_upstream(models):
    head = models["yolox"].head
    prior = -math.log((1 - 0.01) / 0.01)
    for c, o in zip(head.cls_preds, head.obj_preds):
        np.testing.assert_allclose(np.asarray(c.bias[...]), prior, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(o.bias[...]), prior, rtol=1e-6)


def test_yolov8_bias_init_as_upstream(models):
    head = models["yolov8"].head
    for box, cls, s in zip(head.cv2, head.cv3, (8, 16, 32)):
        np.testing.assert_allclose(np.asarray(box[-1].bias[...]), 2.0)
        np.testing.assert_allclose(np.asarray(cls[-1].bias[...]), math.log(5 / NC / (640 / s) ** 2), rtol=1e-6)


def test_yolov8_head_channels_as_upstream():
    head = Yolov8Head((32, 64, 128), 6, reg_max=16, rngs=nnx.Rngs(0))
    # box branch max(16, 32 // 4, 64) = 64, class branch max(32, min(6, 100)) = 32
    assert head.cv2[0][0].conv.out_features == 64
    assert head.cv3[0][0].conv.out_features == 32


def test_width_depth_multipliers():
    chans = {k: Backbone(k, rngs=nnx.Rngs(0)).out_channels for k in ("pico", "nano")}
    assert chans == {"pico": (32, 64, 128), "nano": (64, 128, 256)}
    assert MODEL_SIZES["nano"].repeats(6) == 2 and MODEL_SIZES["nano"].repeats(3) == 1


def test_decode_yolov8_peaked_bins():
    # logits peaked at bin k on each side -> ltrb = k cells around the cell centre.
    nc, reg_max = 2, 16
    p = np.full((1, 2, 2, 4 * reg_max + nc), -1e4, np.float32)
    p[..., 4 * reg_max :] = 0.0
    k = np.array([1, 2, 3, 4])
    for side in range(4):
        p[..., side * reg_max + k[side]] = 0.0
    small = [jnp.asarray(p), jnp.full((1, 1, 1, 4 * reg_max + nc), 0.0), jnp.full((1, 1, 1, 4 * reg_max + nc), 0.0)]
    boxes, scores = decode_yolov8(small, strides=(8, 16, 32), reg_max=reg_max)
    # cell (row 1, col 0) has centre (0.5, 1.5) grid units at stride 8
    np.testing.assert_allclose(np.asarray(boxes[0, 2]), np.array([0.5 - 1, 1.5 - 2, 0.5 + 3, 1.5 + 4]) * 8, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scores[0, 0]), 0.5)
    # uniform logits -> expectation (reg_max - 1) / 2 per side
    np.testing.assert_allclose(np.asarray(boxes[0, -1]), np.array([0.5 - 7.5, 0.5 - 7.5, 0.5 + 7.5, 0.5 + 7.5]) * 32, atol=1e-3)


def test_decode_yolov5_zero_logits():
    anchors = np.asarray(YOLOV5S_ANCHORS, np.float32).reshape(3, 3, 2)
    preds = [jnp.zeros((1, 2, 3, 3, 7)), jnp.zeros((1, 1, 2, 3, 7)), jnp.zeros((1, 1, 1, 3, 7))]
    boxes, scores = decode_yolov5(preds, anchors=anchors, strides=(8, 16, 32))
    assert boxes.shape == (1, (6 + 2 + 1) * 3, 4)
    # sigmoid(0) = 0.5: xy = (2*0.5 - 0.5 + cell) * s = (cell + 0.5) * s, wh = (2*0.5)^2 * anchor
    # level 0, row 1, col 2, anchor 1 -> flat index (1 * 3 + 2) * 3 + 1
    cx, cy = 2.5 * 8, 1.5 * 8
    w, h = anchors[0, 1]
    np.testing.assert_allclose(np.asarray(boxes[0, 16]), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scores), 0.25)


def test_decode_yolox_zero_logits():
    preds = [jnp.zeros((1, 2, 2, 7)), jnp.zeros((1, 1, 1, 7)), jnp.zeros((1, 1, 1, 7))]
    boxes, scores = decode_yolox(preds, strides=(8, 16, 32))
    # xy = (0 + cell) * s, wh = exp(0) * s
    np.testing.assert_allclose(np.asarray(boxes[0, 3]), [8 - 4, 8 - 4, 8 + 4, 8 + 4])
    np.testing.assert_allclose(np.asarray(boxes[0, 5]), [-16, -16, 16, 16])
    np.testing.assert_allclose(np.asarray(scores), 0.25)


def test_batchnorm_train_vs_eval():
    block = ConvBnAct(3, 4, 3, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    block.eval()
    y_eval = block(x)
    np.testing.assert_array_equal(np.asarray(block.bn.mean[...]), 0.0)  # eval: stats untouched
    block.train()
    y_train = block(x)
    z = block.conv(x).reshape(-1, 4)
    # train: batch statistics normalise, running mean moves by (1 - 0.97) toward the batch mean
    np.testing.assert_allclose(np.asarray(block.bn.mean[...]), 0.03 * np.asarray(z.mean(0)), rtol=1e-4, atol=1e-6)
    assert abs(float(jax.nn.sigmoid(y_train).mean()) - float(jax.nn.sigmoid(y_eval).mean())) > 1e-3


def test_bad_inputs():
    m = build_detector("yolox", nc=3, size="pico")
    with pytest.raises(ValueError, match="multiples of 32"):
        m.backbone(jnp.zeros((1, 48, 64, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        m.backbone(jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="head_type"):
        build_detector("yolov7", nc=3)
    with pytest.raises(ValueError, match="size"):
        build_detector("yolov8", nc=3, size="huge")
    with pytest.raises(TypeError, match="head"):
        Detector(m.backbone, object())
    with pytest.raises(ValueError, match="na="):
        decode_yolov5([jnp.zeros((1, 2, 2, 7))] * 3, anchors=YOLOV5S_ANCHORS)
