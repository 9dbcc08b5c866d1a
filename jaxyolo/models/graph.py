"""Upstream's yaml-defined detection models (ultralytics, yolov5) in Flax NNX.

Upstream builds ``DetectionModel.model``, an ``nn.Sequential`` of layers, from
yaml rows ``[from, repeats, module, args]`` scaled by ``(depth, width,
max_channels)`` (``parse_model``), and runs it by feeding each layer the
outputs named by its ``from`` indices.  :class:`GraphModel` is that model:
``self.model`` holds the same layers at the same indices, so a parameter's
path is its ``state_dict`` key (``model.22.cv2.0.1.conv.weight`` ->
``("model", 22, "cv2", 0, 1, "conv", "kernel")``).  The rows live as Python
tables in :mod:`jaxyolo.models.ultralytics` and :mod:`jaxyolo.models.yolov5`;
:func:`parse_table` applies upstream's scaling rules to them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxyolo.models.heads import Yolov5Head, Yolov8Head, decode_yolov5, decode_yolov8
from jaxyolo.models.layers import (
    C2PSA, PSA, SCDown, SPPF, C2f, C2fCIB, C3, C3k2, Concat, ConvBnAct, Upsample, make_divisible,
)

__all__ = ["GraphModel", "parse_table", "check_images"]

STRIDES = (8, 16, 32)  # P3-P5: every table here ends in Detect(P3, P4, P5)
_REPEATED = {"C2f", "C3k2", "C3", "C2PSA", "C2fCIB"}  # upstream's repeat_modules among the ones used here


def check_images(images, dtype):
    """``(B, H, W, 3)`` float images with sides multiple of 32, cast to ``dtype``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got {tuple(images.shape)}")
    if images.shape[1] % 32 or images.shape[2] % 32:
        raise ValueError(f"image height and width must be multiples of 32, got {images.shape[1]}x{images.shape[2]}")
    return images.astype(dtype or jnp.float32)


def parse_table(rows, *, nc: int, depth: float, width: float, max_channels: float = math.inf, scale: str | None = None,
                reg_max: int = 16, end2end: bool = False, dtype=None, rngs: nnx.Rngs):
    """Build the layers of yaml ``rows`` as upstream ``parse_model`` does.

    Args:
      rows: ``[(from, repeats, module, args)]`` (backbone then head), module
        one of Conv, C2f, C3k2, C3, SPPF, C2PSA, SCDown, PSA, C2fCIB,
        Upsample, Concat, Detect (ultralytics head, args ``()``), v10Detect
        (YOLOv10's end-to-end head, args ``()``), AnchorDetect (yolov5 head,
        args ``(anchors,)`` in pixels).
      depth, width, max_channels: the scale (``repeats -> max(round(n depth),
        1)`` when ``n > 1``; ``channels -> make_divisible(min(c, max_channels)
        width, 8)``).
      scale: the ultralytics scale letter: ``m``/``l``/``x`` force ``c3k=True``
        in every C3k2 (upstream's rule).
      reg_max, end2end: the yaml's ``reg_max`` and ``end2end`` (``Detect`` rows).

    Returns:
      ``(layers, froms)``.
    """
    # upstream: Detect.legacy (YOLOv8's class branch) unless the model has C3k2 or C2fCIB
    legacy = not any(r[2] in ("C3k2", "C2fCIB") for r in rows)
    ch, layers, froms = [3], [], []
    for i, (f, n, module, args) in enumerate(rows):
        n = max(round(n * depth), 1) if n > 1 else n
        if module in ("Conv", "C2f", "C3k2", "C3", "SPPF", "C2PSA", "SCDown", "PSA", "C2fCIB"):
            c1, c2 = ch[f], make_divisible(min(args[0], max_channels) * width, 8)
            if n > 1 and module not in _REPEATED:
                raise NotImplementedError(f"row {i}: a repeated {module} is not used by any supported model")
            kw = dict(dtype=dtype, rngs=rngs)
            if module == "Conv":
                m = ConvBnAct(c1, c2, *args[1:3], p=args[3] if len(args) > 3 else None, **kw)
            elif module == "C2f":
                m = C2f(c1, c2, n, shortcut=bool(args[1]) if len(args) > 1 else False, **kw)
            elif module == "C3":
                m = C3(c1, c2, n, shortcut=bool(args[1]) if len(args) > 1 else True, **kw)
            elif module == "C3k2":
                c3k = scale in ("m", "l", "x") or (len(args) > 1 and bool(args[1]))
                m = C3k2(c1, c2, n, c3k=c3k, e=args[2] if len(args) > 2 else 0.5, attn=len(args) > 3 and bool(args[3]), **kw)
            elif module == "SPPF":
                # rows [c2, k] are the legacy SPPF (cv1 with SiLU); YOLO26's [c2, k, n, shortcut] is not
                m = SPPF(c1, c2, args[1], *args[2:3], shortcut=len(args) > 3 and bool(args[3]), cv1_act=len(args) <= 2, **kw)
            elif module == "SCDown":
                m = SCDown(c1, c2, args[1], args[2], **kw)
            elif module == "PSA":
                m = PSA(c1, c2, **kw)
            elif module == "C2fCIB":
                m = C2fCIB(c1, c2, n, shortcut=len(args) > 1 and bool(args[1]), lk=len(args) > 2 and bool(args[2]), **kw)
            else:
                m = C2PSA(c1, c2, n, **kw)
        elif module == "Upsample":
            m, c2 = Upsample(), ch[f]
        elif module == "Concat":
            m, c2 = Concat(), sum(ch[j] for j in f)
        elif module in ("Detect", "v10Detect"):
            # v10Detect = Detect(nc, reg_max=16, end2end=True) with the light (non-legacy) class branch
            v10 = module == "v10Detect"
            m = Yolov8Head([ch[j] for j in f], nc, reg_max=16 if v10 else reg_max, strides=STRIDES,
                           legacy=legacy and not v10, end2end=end2end or v10, dtype=dtype, rngs=rngs)
            c2 = None
        elif module == "AnchorDetect":
            m = Yolov5Head([ch[j] for j in f], nc, anchors=args[0], strides=STRIDES, dtype=dtype, rngs=rngs)
            c2 = None
        else:
            raise ValueError(f"row {i}: unknown module {module!r}")
        layers.append(m)
        froms.append(f)
        if i == 0:
            ch = []
        ch.append(c2)
    return layers, froms


class GraphModel(nnx.Module):
    """An upstream ``DetectionModel`` (ultralytics YOLOv8/YOLO11/YOLO26/YOLOv10 or yolov5).

    ``model(images)``: images ``(B, H, W, 3)`` float in ``[0, 1]`` RGB, sides
    multiples of 32 -> the head's per-level raw predictions (the loss
    layout, see :mod:`jaxyolo.models.heads`); an end-to-end head returns
    ``{"one2many": [...], "one2one": [...]}``.  ``decode(preds)`` -> ``(B, A,
    4)`` xyxy pixels, ``(B, A, nc)`` scores (an end-to-end model's one-to-one
    branch unless ``one2many=True``).

    Attributes: ``name`` (registry name), ``family`` (``"ultralytics"`` |
    ``"yolov5"``), ``head_type`` (``"yolov8"`` | ``"e2e"`` | ``"yolov5"``, the
    loss), ``end2end`` (NMS-free head), ``strides``, ``nc``, ``head``
    (``model[-1]``), ``class_names``.
    """

    def __init__(self, layers, froms, *, name: str, family: str, dtype=None):
        self.model = nnx.List(layers)
        self.froms = tuple(tuple(f) if isinstance(f, list) else f for f in froms)
        idx = [j for f in self.froms for j in ([f] if isinstance(f, int) else f)]
        self.save = frozenset(j % len(layers) for j in idx if j != -1)
        head = layers[-1]
        self.name, self.family = name, family
        self.end2end = bool(getattr(head, "end2end", False))
        self.head_type = "yolov5" if isinstance(head, Yolov5Head) else "e2e" if self.end2end else "yolov8"
        self.strides = tuple(head.strides)
        self.nc = head.nc
        self.dtype = dtype
        self.class_names = None

    @property
    def head(self):
        return self.model[-1]

    def __call__(self, images):
        x = check_images(images, self.dtype)
        y = []
        for i, (m, f) in enumerate(zip(self.model, self.froms)):
            if f != -1:
                x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]
            x = m(x)
            y.append(x if i in self.save else None)
        return x

    def decode(self, preds, *, one2many: bool = False):
        """Raw predictions -> ``(B, A, 4)`` xyxy px, ``(B, A, nc)`` scores.

        For an end-to-end model ``preds`` is its dict (or one branch's list)
        and the one-to-one branch is decoded unless ``one2many``; select its
        detections with :func:`jaxyolo.evaluate.end2end_topk` (no NMS).
        """
        if self.head_type == "yolov5":
            return decode_yolov5(preds, anchors=self.head.anchor_array, strides=self.strides)
        if isinstance(preds, dict):
            preds = preds["one2many" if one2many else "one2one"]
        return decode_yolov8(preds, strides=self.strides, reg_max=self.head.reg_max)
