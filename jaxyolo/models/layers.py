"""Building blocks in NHWC: Conv-BN-SiLU, bottlenecks, C2f, SPPF, upsampling.

Every block maps ``(B, H, W, C_in)`` to ``(B, H', W', C_out)``.  BatchNorm uses
the YOLO settings (``eps=1e-3``, torch momentum 0.03 = flax momentum 0.97);
train/eval is switched on the whole model with ``model.train()`` /
``model.eval()`` (running statistics are updated only in train mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["ConvBnAct", "Bottleneck", "C2f", "SPPF", "upsample2x", "BN_MOMENTUM", "BN_EPS"]

BN_MOMENTUM = 0.97  # torch momentum 0.03
BN_EPS = 1e-3

def _host_rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _torch_conv_init(key, shape, dtype=jnp.float32):
    """torch's default Conv2d weight init (kaiming_uniform, a=sqrt(5)), which
    YOLO keeps: ``U(-b, b)`` with ``b = 1 / sqrt(fan_in)``; ``shape`` is flax's
    ``(kh, kw, C_in / groups, C_out)``.

    Drawn with numpy from the flax key: jax.random would compile one XLA
    kernel per parameter shape (tens of seconds on a CPU for one model).
    """
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return jnp.asarray(_host_rng(key).uniform(-bound, bound, shape), dtype)


def torch_bias_init(fan_in: int):
    """torch's default Conv2d bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (numpy-drawn)."""
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jnp.asarray(_host_rng(key).uniform(-bound, bound, shape), dtype)

    return init


class ConvBnAct(nnx.Module):
    """``k x k`` conv (no bias, 'same' padding, optional depthwise) + BatchNorm + SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, *, groups: int = 1, act: bool = True, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            c_in, c_out, (k, k), strides=(s, s), padding=[(k // 2, k // 2)] * 2, feature_group_count=groups,
            use_bias=False, kernel_init=_torch_conv_init, rngs=rngs,
        )
        self.bn = nnx.BatchNorm(c_out, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)
        self.act = act

    def __call__(self, x):
        x = self.bn(self.conv(x))
        return jax.nn.silu(x) if self.act else x


class Bottleneck(nnx.Module):
    """Two 3x3 ConvBnAct with an optional residual (C2f's inner block, e=1)."""

    def __init__(self, c: int, *, shortcut: bool = True, rngs: nnx.Rngs):
        self.cv1 = ConvBnAct(c, c, 3, rngs=rngs)
        self.cv2 = ConvBnAct(c, c, 3, rngs=rngs)
        self.add = shortcut

    def __call__(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nnx.Module):
    """CSP bottleneck with two convolutions (the YOLOv8 C2f layout).

    ``cv1`` expands to ``2c`` channels split in two halves; ``n`` bottlenecks
    chain on the second half and every intermediate is concatenated before
    the ``cv2`` 1x1 fusion to ``c_out``.
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1, *, shortcut: bool = False, e: float = 0.5, rngs: nnx.Rngs):
        self.c = max(int(c_out * e), 1)
        self.cv1 = ConvBnAct(c_in, 2 * self.c, 1, rngs=rngs)
        self.cv2 = ConvBnAct((2 + n) * self.c, c_out, 1, rngs=rngs)
        self.m = nnx.List([Bottleneck(self.c, shortcut=shortcut, rngs=rngs) for _ in range(n)])

    def __call__(self, x):
        y = self.cv1(x)
        ys = [y[..., : self.c], y[..., self.c :]]
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(jnp.concatenate(ys, axis=-1))


def _maxpool_same(x, k: int):
    pad = k // 2
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1), [(0, 0), (pad, pad), (pad, pad), (0, 0)]
    )


class SPPF(nnx.Module):
    """Spatial pyramid pooling - fast: three chained ``k x k`` max-pools (= SPP(5, 9, 13))."""

    def __init__(self, c_in: int, c_out: int, k: int = 5, *, rngs: nnx.Rngs):
        c_ = c_in // 2
        self.cv1 = ConvBnAct(c_in, c_, 1, rngs=rngs)
        self.cv2 = ConvBnAct(c_ * 4, c_out, 1, rngs=rngs)
        self.k = k

    def __call__(self, x):
        ys = [self.cv1(x)]
        for _ in range(3):
            ys.append(_maxpool_same(ys[-1], self.k))
        return self.cv2(jnp.concatenate(ys, axis=-1))


def upsample2x(x):
    """Nearest-neighbour 2x upsampling of ``(B, H, W, C)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
