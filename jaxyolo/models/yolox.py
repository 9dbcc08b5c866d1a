"""YOLOX as yolox 0.3.0 defines it: CSPDarknet, YOLOPAFPN, YOLOXHead.

Module and attribute names are upstream's (``backbone.backbone.dark3.1.m.0
.conv2``, ``head.cls_convs.0.1`` ...), so parameter paths are the
``state_dict`` keys of ``YOLOX(YOLOPAFPN(depth, width), YOLOXHead(nc, width))``
(the ``Exp.get_model`` of ``yolox/exp/default/*.py``).  ``depthwise=True``
(YOLOX-nano) swaps the 3x3 convs of the CSP bottlenecks, the downsampling
convs of the neck/backbone and the head branches for YOLOX ``DWConv`` pairs.

Input convention: YOLOX 0.3.0 trains on raw 0-255 **BGR** images (cv2, no
normalisation).  :class:`YOLOX` takes jaxyolo's ``[0, 1]`` RGB like every
other model and converts inside (``bgr=True``, ``pixel_scale=255``).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxyolo.models.graph import STRIDES, check_images
from jaxyolo.models.heads import YoloxHead, decode_yolox
from jaxyolo.models.layers import ConvBnAct, Sequential, YoloxDWConv, maxpool_same, upsample2x

__all__ = ["SCALES", "YOLOX", "build_yolox"]

#: ``{size: (depth, width, depthwise)}`` of ``yolox/exp/default/yolox_<size>.py``.
SCALES = {
    "nano": (0.33, 0.25, True), "tiny": (0.33, 0.375, False), "s": (0.33, 0.50, False),
    "m": (0.67, 0.75, False), "l": (1.0, 1.0, False), "x": (1.33, 1.25, False),
}


def _conv(depthwise: bool, c_in: int, c_out: int, k: int, s: int = 1, *, dtype, rngs):
    """YOLOX's ``Conv = DWConv if depthwise else BaseConv``."""
    if depthwise:
        return YoloxDWConv(c_in, c_out, k, s, dtype=dtype, rngs=rngs)
    return ConvBnAct(c_in, c_out, k, s, dtype=dtype, rngs=rngs)


class Bottleneck(nnx.Module):
    """YOLOX ``Bottleneck``: 1x1 ``conv1`` to ``int(c_out e)``, 3x3 ``conv2``, residual if ``shortcut and c_in == c_out``."""

    def __init__(self, c_in, c_out, *, shortcut=True, expansion=0.5, depthwise=False, dtype=None, rngs: nnx.Rngs):
        hidden = int(c_out * expansion)
        self.conv1 = ConvBnAct(c_in, hidden, 1, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(depthwise, hidden, c_out, 3, dtype=dtype, rngs=rngs)
        self.use_add = shortcut and c_in == c_out

    def __call__(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nnx.Module):
    """YOLOX ``CSPLayer`` (yolov5's C3): ``conv3(cat(m(conv1(x)), conv2(x)))``."""

    def __init__(self, c_in, c_out, n=1, *, shortcut=True, expansion=0.5, depthwise=False, dtype=None, rngs: nnx.Rngs):
        hidden = int(c_out * expansion)
        self.conv1 = ConvBnAct(c_in, hidden, 1, dtype=dtype, rngs=rngs)
        self.conv2 = ConvBnAct(c_in, hidden, 1, dtype=dtype, rngs=rngs)
        self.conv3 = ConvBnAct(2 * hidden, c_out, 1, dtype=dtype, rngs=rngs)
        self.m = Sequential([
            Bottleneck(hidden, hidden, shortcut=shortcut, expansion=1.0, depthwise=depthwise, dtype=dtype, rngs=rngs)
            for _ in range(n)
        ])

    def __call__(self, x):
        return self.conv3(jnp.concatenate([self.m(self.conv1(x)), self.conv2(x)], axis=-1))


class Focus(nnx.Module):
    """YOLOX ``Focus``: space-to-depth (top-left, bottom-left, top-right, bottom-right) then a ``BaseConv``."""

    def __init__(self, c_in, c_out, k=1, s=1, *, dtype=None, rngs: nnx.Rngs):
        self.conv = ConvBnAct(4 * c_in, c_out, k, s, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        tl, tr = x[:, ::2, ::2], x[:, ::2, 1::2]
        bl, br = x[:, 1::2, ::2], x[:, 1::2, 1::2]
        return self.conv(jnp.concatenate([tl, bl, tr, br], axis=-1))


class SPPBottleneck(nnx.Module):
    """YOLOX ``SPPBottleneck``: 1x1 to ``c_in // 2``, parallel 5/9/13 max-pools, concat, 1x1."""

    def __init__(self, c_in, c_out, kernel_sizes=(5, 9, 13), *, dtype=None, rngs: nnx.Rngs):
        hidden = c_in // 2
        self.conv1 = ConvBnAct(c_in, hidden, 1, dtype=dtype, rngs=rngs)
        self.conv2 = ConvBnAct(hidden * (len(kernel_sizes) + 1), c_out, 1, dtype=dtype, rngs=rngs)
        self.kernel_sizes = tuple(kernel_sizes)

    def __call__(self, x):
        x = self.conv1(x)
        return self.conv2(jnp.concatenate([x] + [maxpool_same(x, k) for k in self.kernel_sizes], axis=-1))


class CSPDarknet(nnx.Module):
    """YOLOX ``CSPDarknet(dep_mul, wid_mul, depthwise)``: ``(dark3, dark4, dark5)`` features."""

    def __init__(self, dep_mul, wid_mul, *, depthwise=False, dtype=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        c = int(wid_mul * 64)
        d = max(round(dep_mul * 3), 1)
        csp = dict(depthwise=depthwise, **kw)
        self.stem = Focus(3, c, k=3, **kw)
        self.dark2 = Sequential([_conv(depthwise, c, 2 * c, 3, 2, **kw), CSPLayer(2 * c, 2 * c, d, **csp)])
        self.dark3 = Sequential([_conv(depthwise, 2 * c, 4 * c, 3, 2, **kw), CSPLayer(4 * c, 4 * c, 3 * d, **csp)])
        self.dark4 = Sequential([_conv(depthwise, 4 * c, 8 * c, 3, 2, **kw), CSPLayer(8 * c, 8 * c, 3 * d, **csp)])
        self.dark5 = Sequential([
            _conv(depthwise, 8 * c, 16 * c, 3, 2, **kw),
            SPPBottleneck(16 * c, 16 * c, **kw),
            CSPLayer(16 * c, 16 * c, d, shortcut=False, **csp),
        ])

    def __call__(self, x):
        x = self.dark2(self.stem(x))
        d3 = self.dark3(x)
        d4 = self.dark4(d3)
        return d3, d4, self.dark5(d4)


class YOLOPAFPN(nnx.Module):
    """YOLOX ``YOLOPAFPN(depth, width, in_channels=(256, 512, 1024), depthwise)``:
    CSPDarknet + PAN -> ``(pan_out2, pan_out1, pan_out0)`` at strides 8/16/32."""

    def __init__(self, depth, width, *, in_channels=(256, 512, 1024), depthwise=False, dtype=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        c0, c1, c2 = (int(c * width) for c in in_channels)
        n = round(3 * depth)
        csp = dict(shortcut=False, depthwise=depthwise, **kw)
        self.backbone = CSPDarknet(depth, width, depthwise=depthwise, **kw)
        self.lateral_conv0 = ConvBnAct(c2, c1, 1, **kw)
        self.C3_p4 = CSPLayer(int(2 * in_channels[1] * width), c1, n, **csp)
        self.reduce_conv1 = ConvBnAct(c1, c0, 1, **kw)
        self.C3_p3 = CSPLayer(int(2 * in_channels[0] * width), c0, n, **csp)
        self.bu_conv2 = _conv(depthwise, c0, c0, 3, 2, **kw)
        self.C3_n3 = CSPLayer(int(2 * in_channels[0] * width), c1, n, **csp)
        self.bu_conv1 = _conv(depthwise, c1, c1, 3, 2, **kw)
        self.C3_n4 = CSPLayer(int(2 * in_channels[1] * width), c2, n, **csp)
        self.out_channels = (c0, c1, c2)

    def __call__(self, x):
        x2, x1, x0 = self.backbone(x)
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(jnp.concatenate([upsample2x(fpn_out0), x1], axis=-1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(jnp.concatenate([upsample2x(fpn_out1), x2], axis=-1))
        pan_out1 = self.C3_n3(jnp.concatenate([self.bu_conv2(pan_out2), fpn_out1], axis=-1))
        pan_out0 = self.C3_n4(jnp.concatenate([self.bu_conv1(pan_out1), fpn_out0], axis=-1))
        return [pan_out2, pan_out1, pan_out0]


class YOLOX(nnx.Module):
    """YOLOX ``YOLOX(backbone=YOLOPAFPN, head=YOLOXHead)``.

    ``model(images)``: ``(B, H, W, 3)`` float ``[0, 1]`` RGB, sides multiples
    of 32 -> per level ``(B, H_l, W_l, 5 + nc)`` raw ``[x, y, w, h, obj,
    cls...]`` (``yolox_loss``'s layout).  The network itself sees
    ``images[..., ::-1] * 255`` when ``bgr`` (the channel flip) and
    ``pixel_scale`` are set, as upstream's data pipeline feeds it.

    Attributes: ``name``, ``family = "yolox"``, ``head_type = "yolox"``,
    ``strides``, ``nc``, ``bgr = True``, ``pixel_scale = 255.0``, ``class_names``.
    """

    def __init__(self, depth, width, *, nc: int, depthwise: bool = False, name: str, dtype=None, rngs: nnx.Rngs):
        self.backbone = YOLOPAFPN(depth, width, depthwise=depthwise, dtype=dtype, rngs=rngs)
        self.head = YoloxHead(self.backbone.out_channels, nc, hidden=int(256 * width), depthwise=depthwise, dtype=dtype,
                              rngs=rngs)
        self.name, self.family, self.head_type = name, "yolox", "yolox"
        self.strides = STRIDES
        self.nc = nc
        self.dtype = dtype
        self.bgr, self.pixel_scale = True, 255.0
        self.class_names = None

    def __call__(self, images):
        x = check_images(images, self.dtype)
        if self.bgr:
            x = x[..., ::-1]
        return self.head(self.backbone(x * self.pixel_scale))

    def decode(self, preds):
        """Raw per-level predictions -> ``(B, A, 4)`` xyxy px, ``(B, A, nc)`` scores."""
        return decode_yolox(preds, strides=self.strides)


def build_yolox(size: str, *, nc: int, name: str, dtype=None, rngs: nnx.Rngs) -> YOLOX:
    """``get_exp_by_name(f"yolox-{size}").get_model()`` in NNX (upstream's inits)."""
    depth, width, depthwise = SCALES[size]
    return YOLOX(depth, width, nc=nc, depthwise=depthwise, name=name, dtype=dtype, rngs=rngs)
