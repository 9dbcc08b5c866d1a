"""The three detection heads, their upstream bias inits, and inference decoding.

Each head maps the neck's features ``[(B, H_l, W_l, C_l)]`` (strides 8/16/32)
to exactly the per-level raw predictions its loss takes:

==========  ====================================  ==========================
head        per-level output                      loss
==========  ====================================  ==========================
YOLOv5      ``(B, H, W, na, 5 + nc)``             ``jaxyolo.yolov5_loss``
YOLOX       ``(B, H, W, 5 + nc)`` (reg, obj, cls)  ``jaxyolo.yolox_loss``
YOLOv8      ``(B, H, W, 4 reg_max + nc)``         ``jaxyolo.yolov8_loss``
==========  ====================================  ==========================

Each ``decode_*`` function turns those into ``(B, A, 4)`` xyxy boxes in
pixels and ``(B, A, nc)`` scores in ``[0, 1]``; ``A`` runs level by level,
row-major over ``(H, W)`` (and anchors last for YOLOv5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxyolo.boxes import dist2bbox, make_anchor_points
from jaxyolo.models.layers import ConvBnAct, Sequential, YoloxDWConv, conv2d

__all__ = [
    "YOLOV5S_ANCHORS",
    "Yolov5Head",
    "YoloxHead",
    "Yolov8Head",
    "decode_yolov5",
    "decode_yolox",
    "decode_yolov8",
]

# yolov5s.yaml anchors in pixels, (L=3, na=3, 2) as (w, h).
YOLOV5S_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


def _pred_conv(c_in: int, c_out: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
    """A plain 1x1 conv with bias, torch's default weight and bias init."""
    return conv2d(c_in, c_out, 1, bias=True, dtype=dtype, rngs=rngs)


def _check_features(features, channels, name):
    if len(features) != len(channels):
        raise ValueError(f"{name} expects {len(channels)} feature levels, got {len(features)}")
    for i, (f, c) in enumerate(zip(features, channels)):
        if f.ndim != 4 or f.shape[-1] != c:
            raise ValueError(f"{name}: feature level {i} must be (B, H, W, {c}), got {tuple(f.shape)}")


class Yolov5Head(nnx.Module):
    """YOLOv5 ``Detect``: one 1x1 conv per level to ``na * (5 + nc)`` channels.

    Args:
      in_channels: ``(C_l,)`` per level.
      nc: number of classes.
      anchors: ``(L, na, 2)`` (or ``(L, 2 na)``) anchor sizes in **pixels**.
      strides: pixels per cell of each level.
      prior_image_size: the image side of upstream's ``_initialize_biases``
        prior ("8 objects per 640 image"); upstream hard-codes 640.
      dtype: computation dtype.

    Parameter paths are upstream's ``Detect.m.<level>``; the anchors are
    static (upstream's ``anchors`` buffer holds them divided by the strides).
    Bias init as upstream ``_initialize_biases(cf=None)``: on top of torch's
    default init, objectness ``+= log(8 / (640 / s)^2)`` and classes
    ``+= log(0.6 / (nc - 0.99999))``.
    """

    def __init__(self, in_channels, nc: int, *, anchors=YOLOV5S_ANCHORS, strides=(8, 16, 32), prior_image_size: int = 640,
                 dtype=None, rngs: nnx.Rngs):
        anchors = np.asarray(anchors, np.float32)
        anchors = anchors.reshape(anchors.shape[0], -1, 2)
        if anchors.shape[0] != len(in_channels) or len(strides) != len(in_channels):
            raise ValueError(
                f"anchors {anchors.shape}, strides {tuple(strides)} and in_channels {tuple(in_channels)} must have one entry per level"
            )
        self.nc, self.na, self.no = nc, anchors.shape[1], nc + 5
        self.anchors = tuple(map(tuple, anchors.reshape(anchors.shape[0], -1).tolist()))  # static, pixels
        self.strides = tuple(strides)
        self.in_channels = tuple(in_channels)
        self.m = nnx.List([_pred_conv(c, self.na * self.no, dtype=dtype, rngs=rngs) for c in in_channels])
        for conv, s in zip(self.m, strides):
            b = conv.bias[...].reshape(self.na, self.no)
            b = b.at[:, 4].add(math.log(8 / (prior_image_size / s) ** 2))
            b = b.at[:, 5:].add(math.log(0.6 / (nc - 0.99999)))
            conv.bias[...] = b.reshape(-1)

    @property
    def anchor_array(self):
        """``(L, na, 2)`` anchors in pixels, as ``yolov5_loss`` takes them."""
        return np.asarray(self.anchors, np.float32).reshape(len(self.anchors), self.na, 2)

    def __call__(self, features):
        _check_features(features, self.in_channels, "Yolov5Head")
        out = []
        for f, conv in zip(features, self.m):
            y = conv(f)
            out.append(y.reshape(*y.shape[:3], self.na, self.no))
        return out


class YoloxHead(nnx.Module):
    """YOLOX decoupled head (``YOLOXHead``): per level a 1x1 stem, then two 3x3
    convs for classification and two for regression (YOLOX ``DWConv`` pairs
    with ``depthwise=True``, as YOLOX-nano); ``reg`` (4) and ``obj`` (1) come
    from the regression branch, ``cls`` (nc) from the classification branch.

    Output per level ``(B, H, W, 5 + nc)`` = ``[reg x, y, w, h, obj, cls...]``
    (upstream's training-mode ``output`` before decoding).  ``hidden`` is
    upstream's ``int(256 * width)`` (= ``in_channels[0]`` for the YOLOX
    necks).  Bias init as YOLOX ``initialize_biases(prior_prob=1e-2)``: cls
    and obj biases ``= -log((1 - p) / p)``.
    """

    def __init__(self, in_channels, nc: int, *, hidden: int | None = None, depthwise: bool = False, prior_prob: float = 1e-2,
                 dtype=None, rngs: nnx.Rngs):
        hidden = hidden or in_channels[0]
        self.nc = nc
        self.in_channels = tuple(in_channels)

        def conv3(c_in, c_out):
            if depthwise:
                return YoloxDWConv(c_in, c_out, 3, dtype=dtype, rngs=rngs)
            return ConvBnAct(c_in, c_out, 3, dtype=dtype, rngs=rngs)

        self.stems = nnx.List([ConvBnAct(c, hidden, 1, dtype=dtype, rngs=rngs) for c in in_channels])
        self.cls_convs = nnx.List([Sequential([conv3(hidden, hidden), conv3(hidden, hidden)]) for _ in in_channels])
        self.reg_convs = nnx.List([Sequential([conv3(hidden, hidden), conv3(hidden, hidden)]) for _ in in_channels])
        self.cls_preds = nnx.List([_pred_conv(hidden, nc, dtype=dtype, rngs=rngs) for _ in in_channels])
        self.reg_preds = nnx.List([_pred_conv(hidden, 4, dtype=dtype, rngs=rngs) for _ in in_channels])
        self.obj_preds = nnx.List([_pred_conv(hidden, 1, dtype=dtype, rngs=rngs) for _ in in_channels])
        prior = -math.log((1 - prior_prob) / prior_prob)
        for conv in list(self.cls_preds) + list(self.obj_preds):
            conv.bias[...] = jnp.full_like(conv.bias[...], prior)

    def __call__(self, features):
        _check_features(features, self.in_channels, "YoloxHead")
        out = []
        for i, f in enumerate(features):
            x = self.stems[i](f)
            c = self.cls_convs[i](x)
            r = self.reg_convs[i](x)
            out.append(jnp.concatenate([self.reg_preds[i](r), self.obj_preds[i](r), self.cls_preds[i](c)], axis=-1))
        return out


class Yolov8Head(nnx.Module):
    """The decoupled head of YOLOv8 / YOLO11 / YOLO26 / YOLOv10 (ultralytics
    ``Detect``, ``v10Detect``).

    ``cv2`` (box) per level: two 3x3 ``Conv`` then a 1x1 conv to
    ``4 reg_max``.  ``cv3`` (class): with ``legacy=True`` (YOLOv8, and
    upstream's choice for every yaml without C3k2 or C2fCIB) two 3x3 ``Conv``
    then a 1x1 conv to ``nc``; with ``legacy=False`` (YOLO11, YOLO26, and
    ``v10Detect``'s light class head, the same layers) two (depthwise 3x3
    ``DWConv``, 1x1 ``Conv``) pairs then the 1x1 conv.

    Output per level ``(B, H, W, 4 reg_max + nc)``: the box channels (DFL
    logits ltrb-major, ``reg_max`` bins each; with ``reg_max=1``, YOLO26's
    DFL-free head, the 4 ltrb distances in grid units) then class logits
    (upstream's training-mode ``boxes``/``scores``).  Channels as upstream:
    box branch ``max(16, C_0 // 4, 4 reg_max)``, class branch
    ``max(C_0, min(nc, 100))``.  Bias init as ultralytics 8.4.190
    ``Detect.bias_init``: box biases ``= 2.0``, class biases
    ``= log(5 / nc / (640 / s)^2)``.  Upstream's ``dfl`` (a fixed
    ``arange(reg_max)`` 1x1 conv) is the expectation in :func:`decode_yolov8`.

    ``end2end=True`` (YOLO26, YOLOv10) adds the one-to-one branch
    ``one2one_cv2``/``one2one_cv3``, a copy of ``cv2``/``cv3`` at init (as
    upstream's ``deepcopy``), fed ``stop_gradient`` features: as upstream in
    training, its loss trains only its own layers, never the backbone
    (upstream does not detach in eval mode, where no gradient is taken).
    The output is then ``{"one2many": [...], "one2one": [...]}`` of per-level
    arrays as above (upstream's training-mode dict, without ``feats``).
    """

    def __init__(self, in_channels, nc: int, *, reg_max: int = 16, strides=(8, 16, 32), legacy: bool = True,
                 end2end: bool = False, prior_image_size: int = 640, dtype=None, rngs: nnx.Rngs):
        if len(strides) != len(in_channels):
            raise ValueError(f"strides {tuple(strides)} and in_channels {tuple(in_channels)} must have one entry per level")
        self.nc, self.reg_max, self.legacy, self.end2end = nc, reg_max, legacy, bool(end2end)
        self.in_channels = tuple(in_channels)
        self.strides = tuple(strides)
        c2 = max(16, in_channels[0] // 4, reg_max * 4)
        c3 = max(in_channels[0], min(nc, 100))

        def conv(c_in, c_out, k=3, groups=1):
            return ConvBnAct(c_in, c_out, k, groups=groups, dtype=dtype, rngs=rngs)

        self.cv2 = nnx.List(
            [Sequential([conv(c, c2), conv(c2, c2), _pred_conv(c2, 4 * reg_max, dtype=dtype, rngs=rngs)]) for c in in_channels]
        )
        if legacy:
            cls = [Sequential([conv(c, c3), conv(c3, c3), _pred_conv(c3, nc, dtype=dtype, rngs=rngs)]) for c in in_channels]
        else:
            cls = [
                Sequential([
                    Sequential([conv(c, c, 3, groups=c), conv(c, c3, 1)]),
                    Sequential([conv(c3, c3, 3, groups=c3), conv(c3, c3, 1)]),
                    _pred_conv(c3, nc, dtype=dtype, rngs=rngs),
                ])
                for c in in_channels
            ]
        self.cv3 = nnx.List(cls)
        for box, cls, s in zip(self.cv2, self.cv3, strides):
            box[-1].bias[...] = jnp.full_like(box[-1].bias[...], 2.0)
            cls[-1].bias[...] = jnp.full_like(cls[-1].bias[...], math.log(5 / nc / (prior_image_size / s) ** 2))
        if self.end2end:
            self.one2one_cv2 = nnx.clone(self.cv2)
            self.one2one_cv3 = nnx.clone(self.cv3)

    @staticmethod
    def _branch(box, cls, features):
        return [jnp.concatenate([box[i](f), cls[i](f)], axis=-1) for i, f in enumerate(features)]

    def __call__(self, features):
        _check_features(features, self.in_channels, "Yolov8Head")
        preds = self._branch(self.cv2, self.cv3, features)
        if not self.end2end:
            return preds
        detached = [jax.lax.stop_gradient(f) for f in features]
        return {"one2many": preds, "one2one": self._branch(self.one2one_cv2, self.one2one_cv3, detached)}


# ---------------------------------------------------------------- decoding


def _grid(h: int, w: int):
    """``(H, W, 2)`` float32 cell indices ``(x, y)``."""
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return jnp.asarray(np.stack([gx, gy], axis=-1))


def _check_levels(preds, strides, name):
    if len(preds) != len(strides):
        raise ValueError(f"{name}: got {len(preds)} prediction levels but {len(strides)} strides")


def decode_yolov5(preds, *, anchors, strides=(8, 16, 32)):
    """YOLOv5 inference decoding (``Detect`` in eval mode).

    Args:
      preds: per level ``(B, H, W, na, 5 + nc)`` raw logits.
      anchors: ``(L, na, 2)`` anchor sizes in pixels.
      strides: pixels per cell of each level.

    Returns:
      ``boxes (B, A, 4)`` xyxy pixels with ``A = sum_l H W na``:
      ``xy = (2 sigmoid(t) - 0.5 + cell) * s``, ``wh = (2 sigmoid(t))^2 * anchor``;
      ``scores (B, A, nc)`` = ``sigmoid(obj) * sigmoid(cls)``.
    """
    _check_levels(preds, strides, "decode_yolov5")
    anchors = np.asarray(anchors, np.float32).reshape(len(preds), -1, 2)
    boxes, scores = [], []
    for p, a, s in zip(preds, anchors, strides):
        if p.ndim != 5 or p.shape[3] != a.shape[0]:
            raise ValueError(f"decode_yolov5: each level must be (B, H, W, na={a.shape[0]}, 5 + nc), got {tuple(p.shape)}")
        b, h, w = p.shape[:3]
        y = jax.nn.sigmoid(p.astype(jnp.float32))
        xy = (y[..., :2] * 2 - 0.5 + _grid(h, w)[:, :, None, :]) * s
        wh = (y[..., 2:4] * 2) ** 2 * jnp.asarray(a)
        boxes.append(jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1).reshape(b, -1, 4))
        scores.append((y[..., 4:5] * y[..., 5:]).reshape(b, h * w * a.shape[0], -1))
    return jnp.concatenate(boxes, axis=1), jnp.concatenate(scores, axis=1)


def decode_yolox(preds, *, strides=(8, 16, 32)):
    """YOLOX inference decoding.

    Args:
      preds: per level ``(B, H, W, 5 + nc)`` raw outputs ``[x, y, w, h, obj, cls...]``.
      strides: pixels per cell of each level.

    Returns:
      ``boxes (B, A, 4)`` xyxy pixels (``xy = (raw + cell) * s``, ``wh = exp(raw) * s``),
      ``scores (B, A, nc)`` = ``sigmoid(obj) * sigmoid(cls)``.
    """
    _check_levels(preds, strides, "decode_yolox")
    boxes, scores = [], []
    for p, s in zip(preds, strides):
        if p.ndim != 4:
            raise ValueError(f"decode_yolox: each level must be (B, H, W, 5 + nc), got {tuple(p.shape)}")
        b, h, w = p.shape[:3]
        p = p.astype(jnp.float32)
        xy = (p[..., :2] + _grid(h, w)) * s
        wh = jnp.exp(jnp.minimum(p[..., 2:4], 20.0)) * s
        boxes.append(jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1).reshape(b, -1, 4))
        scores.append((jax.nn.sigmoid(p[..., 4:5]) * jax.nn.sigmoid(p[..., 5:])).reshape(b, h * w, -1))
    return jnp.concatenate(boxes, axis=1), jnp.concatenate(scores, axis=1)


def decode_yolov8(preds, *, strides=(8, 16, 32), reg_max: int = 16):
    """YOLOv8 inference decoding (DFL expectation, ``dist2bbox``).

    Args:
      preds: per level ``(B, H, W, 4 reg_max + nc)`` (one branch of an
        end-to-end head).
      strides: pixels per cell of each level.
      reg_max: DFL bins per side; 1: the box channels are the ltrb distances
        themselves (YOLO26; upstream's ``dfl`` is the identity).

    Returns:
      ``boxes (B, A, 4)`` xyxy pixels: ltrb = ``softmax(logits) . arange(reg_max)``
      in grid units around the cell centre, times the stride;
      ``scores (B, A, nc)`` = ``sigmoid(cls)``.
    """
    _check_levels(preds, strides, "decode_yolov8")
    b = preds[0].shape[0]
    for p in preds:
        if p.ndim != 4 or p.shape[-1] <= 4 * reg_max:
            raise ValueError(f"decode_yolov8: each level must be (B, H, W, 4*reg_max + nc) with reg_max={reg_max}, got {tuple(p.shape)}")
    flat = jnp.concatenate([p.reshape(b, -1, p.shape[-1]) for p in preds], axis=1).astype(jnp.float32)
    points, stride = make_anchor_points([p.shape[1:3] for p in preds], strides)
    if reg_max == 1:
        ltrb = flat[..., :4]
    else:
        logits = flat[..., : 4 * reg_max].reshape(b, -1, 4, reg_max)
        ltrb = jax.nn.softmax(logits, axis=-1) @ jnp.arange(reg_max, dtype=jnp.float32)
    boxes = dist2bbox(ltrb, points, xywh=False) * stride
    return boxes, jax.nn.sigmoid(flat[..., 4 * reg_max :])
