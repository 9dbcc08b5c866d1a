"""Building blocks in NHWC, layer for layer as ultralytics / yolov5 define them.

Every block maps ``(B, H, W, C_in)`` to ``(B, H', W', C_out)``.  Attribute
names are upstream's (``cv1``, ``m``, ``conv``, ``bn`` ...), so a parameter's
path is its PyTorch ``state_dict`` key with flax leaf names (see
:mod:`jaxyolo.models.convert`).  Convolutions pad like torch
(``padding=((p, p), (p, p))``, never "SAME", which differs at stride 2).

BatchNorm is :class:`BatchNorm`, torch's ``BatchNorm2d`` semantics with the
YOLO settings (``eps=1e-3``, torch momentum 0.03; ultralytics, yolov5 and
YOLOX all set these in ``initialize_weights`` / ``init_yolo``).  Train/eval is
switched on the whole model with ``model.train()`` / ``model.eval()``.

``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``); parameters and
BatchNorm statistics stay float32 and BatchNorm normalises in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "Attention",
    "BatchNorm",
    "batch_norm_train",
    "Bottleneck",
    "C2PSA",
    "C2f",
    "C2fCIB",
    "C3",
    "C3k2",
    "CIB",
    "Concat",
    "ConvBnAct",
    "PSA",
    "PSABlock",
    "RepVGGDW",
    "SCDown",
    "SPPF",
    "Sequential",
    "Upsample",
    "YoloxDWConv",
    "conv2d",
    "make_divisible",
    "maxpool_same",
    "upsample2x",
]

BN_MOMENTUM = 0.03  # torch convention: running = (1 - m) * running + m * batch
BN_EPS = 1e-3


def _host_rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _uniform(key, bound: float, shape, dtype):
    """``U(-bound, bound)`` drawn with numpy from the flax key (jax.random would
    compile one XLA kernel per parameter shape: tens of seconds on a CPU for
    one model); under abstract evaluation (``nnx.eval_shape``, jit) with
    ``jax.random`` instead."""
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return jnp.asarray(_host_rng(key).uniform(-bound, bound, shape), dtype)


def _torch_conv_init(key, shape, dtype=jnp.float32):
    """torch's default Conv2d weight init (kaiming_uniform, a=sqrt(5)), which
    YOLO keeps: ``U(-b, b)`` with ``b = 1 / sqrt(fan_in)``; ``shape`` is flax's
    ``(kh, kw, C_in / groups, C_out)``."""
    return _uniform(key, 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1)), shape, dtype)


def torch_bias_init(fan_in: int):
    """torch's default Conv2d bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""

    def init(key, shape, dtype=jnp.float32):
        return _uniform(key, 1.0 / max(fan_in, 1) ** 0.5, shape, dtype)

    return init


def conv2d(c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, *, groups: int = 1, bias: bool = False,
           dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
    """``torch.nn.Conv2d(c_in, c_out, k, s, p, groups=groups, bias=bias)`` with torch's
    default init; ``p`` defaults to ``k // 2`` (upstream ``autopad``)."""
    p = k // 2 if p is None else p
    return nnx.Conv(
        c_in, c_out, (k, k), strides=(s, s), padding=((p, p), (p, p)), feature_group_count=groups, use_bias=bias,
        kernel_init=_torch_conv_init, bias_init=torch_bias_init(c_in // groups * k * k), dtype=dtype, rngs=rngs,
        conv_general_dilated=_conv_general_dilated,
    )


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``jax.lax.conv_general_dilated`` as :class:`flax.nnx.Conv` calls it,
    with depthwise convolutions (``groups == C_in == C_out``, NHWC) written
    as a sum of ``k * k`` shifted, per-channel scaled slices.

    XLA:CPU's Eigen convolution runs a depthwise 3x3 convolution (YOLO11's
    head, YOLOX's DWConv) as a grouped convolution at a tiny fraction of its
    arithmetic speed (about 30 ms for one 16x16x16x80 layer on a 2-core CPU,
    more than the rest of the layer); the shifted sum is elementwise work XLA
    fuses into one loop, forward and backward, on every backend.  Same value
    up to float32 rounding of the summation order.
    """
    c_in, c_out = lhs.shape[-1], rhs.shape[-1]
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    if (feature_group_count == c_in == c_out and c_in > 1 and rhs.shape[-2] == 1 and not dilated and lhs.ndim == 4
            and not isinstance(padding, str) and not kwargs.get("preferred_element_type")):
        return _depthwise(lhs, rhs, tuple(window_strides), tuple(tuple(q) for q in padding))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)


def _depthwise(x, w, strides, padding):
    """Depthwise convolution of ``(B, H, W, C)`` with ``(kh, kw, 1, C)`` as a
    sum of shifted slices (cross-correlation, torch's and XLA's convention);
    at stride 1 with :func:`_depthwise_s1`'s backward."""
    (pt, pb), (pl, pr) = padding
    kh, kw = w.shape[:2]
    if tuple(strides) == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw:
        return _depthwise_s1(x, w, padding)
    return _shifted_sum(x, w, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_s1(x, w, padding):
    """Stride-1 depthwise convolution whose input gradient is again a shifted
    sum (of the output gradient with the flipped kernel) and whose weight
    gradient is ``k * k`` per-channel reductions.

    Autodiff of the shifted sum scatters each tap's gradient back through a
    pad into the input's shape: XLA fuses the ``k * k`` pads into one loop
    that tests every element against every pad's bounds, about ten times the
    forward's time (9.6 ms for yolo11n's 8x40x40x80 head layer on a 2-core
    Xeon; the yolo11n step at B 8, 320 px 743 -> 716 ms, docs/speed.md).
    """
    return _shifted_sum(x, w, (1, 1), padding)


def _depthwise_s1_fwd(x, w, padding):
    return _shifted_sum(x, w, (1, 1), padding), (x, w)


def _depthwise_s1_bwd(padding, res, dy):
    x, w = res
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    dx = _shifted_sum(dy, w[::-1, ::-1], (1, 1), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    b, ho, wo, c = dy.shape
    dw = jnp.stack([jnp.sum(jax.lax.slice(xp, (0, i, j, 0), (b, i + ho, j + wo, c)) * dy, (0, 1, 2))
                    for i in range(kh) for j in range(kw)])
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_depthwise_s1.defvjp(_depthwise_s1_fwd, _depthwise_s1_bwd)


def _shifted_sum(x, w, strides, padding):
    """``sum_ij slice_ij(pad(x)) * w[i, j, 0]``: the depthwise convolution's value."""
    kh, kw = w.shape[:2]
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    b, hp, wp, c = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            y = tap * w[i, j, 0] if y is None else y + tap * w[i, j, 0]
    return y


class Sequential(nnx.List):
    """``torch.nn.Sequential``: children indexed ``0, 1, ...`` (as in the
    ``state_dict`` keys), called in order."""

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the last axis.

    Train mode (``use_running_average=False``, the default as in torch)
    normalises with the batch mean and *biased* variance (two-pass) and moves
    the running statistics by ``momentum`` toward the batch mean and the
    *unbiased* variance, as torch does; eval mode uses the running statistics.
    Statistics and parameters are float32; the output has ``dtype`` (default:
    the input's).
    """

    def __init__(self, c: int, *, momentum: float = BN_MOMENTUM, eps: float = BN_EPS, dtype=None,
                 use_running_average: bool = False):
        self.scale = nnx.Param(jnp.ones((c,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))
        self.momentum, self.epsilon, self.dtype = momentum, eps, dtype
        self.use_running_average = use_running_average

    def __call__(self, x, *, silu: bool = False):
        """``(B, H, W, C)`` -> same shape; ``silu=True`` applies SiLU to the
        output (one fused pass in train mode, see :func:`batch_norm_train`)."""
        dtype = self.dtype or x.dtype
        if self.use_running_average:
            y = _bn_apply(x.astype(jnp.float32), self.mean[...], jax.lax.rsqrt(self.var[...] + self.epsilon), self.scale[...],
                          self.bias[...])
            return (jax.nn.silu(y) if silu else y).astype(dtype)
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], eps=self.epsilon, silu=silu)
        n = x.size // x.shape[-1]
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
        self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        return y.astype(dtype)


def _bn_apply(xf, mean, inv, scale, bias):
    """The normalisation both modes share, in this order (float32)."""
    return (xf - mean) * (scale * inv) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, eps, silu):
    return _bn_train_fwd(x, scale, bias, eps, silu)[0]


def _bn_train_fwd(x, scale, bias, eps, silu):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - mean), axes)  # biased, two-pass (torch)
    inv = jax.lax.rsqrt(var + eps)
    z = _bn_apply(xf, mean, inv, scale, bias)
    y = z * jax.nn.sigmoid(z) if silu else z
    return (y, mean, var), (x, mean, inv, scale, bias)


def _bn_train_bwd(eps, silu, res, cts):
    x, mean, inv, scale, bias = res
    gy, g_mean, g_var = cts
    xhat = (x.astype(jnp.float32) - mean) * inv
    if silu:
        z = xhat * scale + bias
        s = jax.nn.sigmoid(z)
        gz = gy * (s * (1 + z * (1 - s)))  # d silu(z) / dz, with sigmoid(z) computed once
    else:
        gz = gy
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    g_bias = jnp.sum(gz, axes)
    g_scale = jnp.sum(gz * xhat, axes)
    gx = (scale * inv) * (gz - g_bias / n - xhat * (g_scale / n))
    # The batch statistics' own cotangents (zero when only the running averages
    # read them, under stop_gradient): d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n.
    gx = gx + g_mean / n + g_var * (2 / n) * xhat / inv
    return gx.astype(x.dtype), g_scale, g_bias


_batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def batch_norm_train(x, scale, bias, *, eps: float = BN_EPS, silu: bool = False):
    """Train-mode BatchNorm (optionally followed by SiLU) with a hand-written backward.

    The value is torch's ``BatchNorm2d`` in train mode: batch mean and biased
    variance (two passes) over every axis but the last, computed in float32.
    The backward is the textbook BatchNorm gradient in two passes over the
    activations (one reduction for ``sum(g)`` and ``sum(g * x_hat)``, one
    elementwise pass), with SiLU's derivative folded in and ``x_hat``
    recomputed from the saved input rather than stored.  XLA's own derivative
    of the forward formula takes several more passes over activations of the
    size of the feature maps; on a CPU the train step of a nano model spends
    more time in them than in its convolutions.

    Args:
      x: ``(..., C)`` activations (any float dtype).
      scale, bias: ``(C,)`` float32, BatchNorm's weight and bias.
      eps: added to the variance.
      silu: apply SiLU to the normalised output.

    Returns:
      ``(y, mean, var)``: ``y`` float32 of ``x``'s shape, the batch ``mean``
      and biased ``var`` ``(C,)`` (for the running statistics).
    """
    return _batch_norm_train(x, scale, bias, float(eps), bool(silu))


class ConvBnAct(nnx.Module):
    """Upstream ``Conv`` (ultralytics/yolov5) = YOLOX ``BaseConv``: ``k x k``
    conv (no bias, padding ``p``, default ``k // 2``; ``groups``) + BatchNorm +
    SiLU (``act=False``: identity)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, *, p: int | None = None, groups: int = 1,
                 act: bool = True, dtype=None, rngs: nnx.Rngs):
        self.conv = conv2d(c_in, c_out, k, s, p, groups=groups, dtype=dtype, rngs=rngs)
        self.bn = BatchNorm(c_out, dtype=dtype)
        self.act = act

    def __call__(self, x):
        return self.bn(self.conv(x), silu=self.act)


class Bottleneck(nnx.Module):
    """Upstream ``Bottleneck(c1, c2, shortcut, g, k, e)``: ``cv1`` ``k[0] x k[0]``
    to ``int(c2 e)`` channels, ``cv2`` ``k[1] x k[1]`` to ``c2``, residual when
    ``shortcut and c1 == c2``.  yolov5's Bottleneck is ``k=(1, 3)``."""

    def __init__(self, c1: int, c2: int, *, shortcut: bool = True, k=(3, 3), e: float = 0.5, dtype=None, rngs: nnx.Rngs):
        c_ = int(c2 * e)
        self.cv1 = ConvBnAct(c1, c_, k[0], dtype=dtype, rngs=rngs)
        self.cv2 = ConvBnAct(c_, c2, k[1], dtype=dtype, rngs=rngs)
        self.add = shortcut and c1 == c2

    def __call__(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nnx.Module):
    """CSP bottleneck with two convolutions (ultralytics ``C2f``).

    ``cv1`` expands to ``2c`` channels split in two halves; ``n`` bottlenecks
    (3x3, 3x3, ``e=1``) chain on the second half and every intermediate is
    concatenated before the ``cv2`` 1x1 fusion to ``c_out``.
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1, *, shortcut: bool = False, e: float = 0.5, dtype=None,
                 rngs: nnx.Rngs):
        self.c = max(int(c_out * e), 1)
        self.cv1 = ConvBnAct(c_in, 2 * self.c, 1, dtype=dtype, rngs=rngs)
        self.cv2 = ConvBnAct((2 + n) * self.c, c_out, 1, dtype=dtype, rngs=rngs)
        self.m = nnx.List([Bottleneck(self.c, self.c, shortcut=shortcut, e=1.0, dtype=dtype, rngs=rngs) for _ in range(n)])

    def __call__(self, x):
        y = self.cv1(x)
        ys = [y[..., : self.c], y[..., self.c :]]
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(jnp.concatenate(ys, axis=-1))


class C3(nnx.Module):
    """CSP bottleneck with three convolutions (yolov5 / ultralytics ``C3``):
    ``cv3(cat(m(cv1(x)), cv2(x)))`` with ``n`` ``Bottleneck(k=bottleneck_k, e=1)``.
    ultralytics' ``C3k`` is this with ``bottleneck_k=(3, 3)``."""

    def __init__(self, c1: int, c2: int, n: int = 1, *, shortcut: bool = True, e: float = 0.5, bottleneck_k=(1, 3),
                 dtype=None, rngs: nnx.Rngs):
        c_ = int(c2 * e)
        self.cv1 = ConvBnAct(c1, c_, 1, dtype=dtype, rngs=rngs)
        self.cv2 = ConvBnAct(c1, c_, 1, dtype=dtype, rngs=rngs)
        self.cv3 = ConvBnAct(2 * c_, c2, 1, dtype=dtype, rngs=rngs)
        self.m = Sequential(
            [Bottleneck(c_, c_, shortcut=shortcut, k=bottleneck_k, e=1.0, dtype=dtype, rngs=rngs) for _ in range(n)]
        )

    def __call__(self, x):
        return self.cv3(jnp.concatenate([self.m(self.cv1(x)), self.cv2(x)], axis=-1))


class C3k2(C2f):
    """ultralytics ``C3k2(c1, c2, n, c3k, e, attn, shortcut=True)``: a C2f
    whose blocks are ``C3k(c, c, 2)`` (``c3k=True``), ``Bottleneck(c, c)``
    (3x3, 3x3, ``e=0.5``), or with ``attn=True`` (YOLO26's last neck block)
    ``Sequential(Bottleneck(c, c), PSABlock(c, 0.5, max(c // 64, 1)))``;
    ``attn`` wins over ``c3k`` as upstream."""

    def __init__(self, c1: int, c2: int, n: int = 1, *, c3k: bool = False, e: float = 0.5, attn: bool = False,
                 shortcut: bool = True, dtype=None, rngs: nnx.Rngs):
        super().__init__(c1, c2, n, shortcut=shortcut, e=e, dtype=dtype, rngs=rngs)
        c = self.c
        kw = dict(dtype=dtype, rngs=rngs)

        def block():
            if attn:
                return Sequential([Bottleneck(c, c, shortcut=shortcut, **kw), PSABlock(c, 0.5, max(c // 64, 1), **kw)])
            if c3k:
                return C3(c, c, 2, shortcut=shortcut, bottleneck_k=(3, 3), **kw)
            return Bottleneck(c, c, shortcut=shortcut, **kw)

        self.m = nnx.List([block() for _ in range(n)])


class Attention(nnx.Module):
    """ultralytics ``Attention(dim, num_heads, attn_ratio)``: multi-head
    self-attention over the ``H W`` positions with a depthwise 3x3 positional
    encoding of ``v``.  ``qkv`` channels are per head ``[q (key_dim), k
    (key_dim), v (head_dim)]``, head-major, as upstream's ``view``/``split``."""

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5, *, dtype=None, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        h = dim + self.key_dim * num_heads * 2
        self.qkv = ConvBnAct(dim, h, 1, act=False, dtype=dtype, rngs=rngs)
        self.proj = ConvBnAct(dim, dim, 1, act=False, dtype=dtype, rngs=rngs)
        self.pe = ConvBnAct(dim, dim, 3, groups=dim, act=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, self.num_heads, 2 * self.key_dim + self.head_dim)
        q, k, v = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)  # (B, N, heads, d)
        logits = jnp.einsum("bihd,bjhd->bhij", q * self.scale, k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhij,bjhd->bihd", attn, v).reshape(b, h, w, c)
        return self.proj(out + self.pe(v.reshape(b, h, w, c)))


class PSABlock(nnx.Module):
    """ultralytics ``PSABlock``: ``x + attn(x)`` then ``x + ffn(x)`` (1x1 to
    ``2c`` with SiLU, 1x1 back without)."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, *, shortcut: bool = True, dtype=None,
                 rngs: nnx.Rngs):
        self.attn = Attention(c, num_heads, attn_ratio, dtype=dtype, rngs=rngs)
        self.ffn = Sequential([ConvBnAct(c, 2 * c, 1, dtype=dtype, rngs=rngs),
                               ConvBnAct(2 * c, c, 1, act=False, dtype=dtype, rngs=rngs)])
        self.add = shortcut

    def __call__(self, x):
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nnx.Module):
    """ultralytics ``C2PSA(c1, c2, n, e)``: split ``cv1(x)`` in halves, ``n``
    PSA blocks (``max(c // 64, 1)`` heads) on the second, ``cv2`` fuses."""

    def __init__(self, c1: int, c2: int, n: int = 1, *, e: float = 0.5, dtype=None, rngs: nnx.Rngs):
        if c1 != c2:
            raise ValueError(f"C2PSA needs c1 == c2, got {c1} and {c2}")
        self.c = int(c1 * e)
        self.cv1 = ConvBnAct(c1, 2 * self.c, 1, dtype=dtype, rngs=rngs)
        self.cv2 = ConvBnAct(2 * self.c, c1, 1, dtype=dtype, rngs=rngs)
        self.m = Sequential(
            [PSABlock(self.c, 0.5, max(self.c // 64, 1), dtype=dtype, rngs=rngs) for _ in range(n)]
        )

    def __call__(self, x):
        y = self.cv1(x)
        return self.cv2(jnp.concatenate([y[..., : self.c], self.m(y[..., self.c :])], axis=-1))


def _maxpool(x, k: int, axes=(1, 2)):
    """Max over a ``k``-wide window (stride 1, ``k // 2`` padding) along ``axes``."""
    window, pads = [1] * x.ndim, [(0, 0)] * x.ndim
    for a in axes:
        window[a], pads[a] = k, (k // 2, k // 2)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, tuple(window), (1,) * x.ndim, pads)


def _route_to_first_max(x, y, g, k: int, axis: int):
    """The gradient of a 1-D ``k``-wide max-pool along ``axis`` (``y`` its
    output): each ``g`` goes to the *first* window position holding the max."""
    p = k // 2
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (p, p)
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    gp = jnp.zeros(xp.shape, g.dtype)
    for d in range(k):  # window positions in order; output i reads input i + d - p
        hit = (jax.lax.slice_in_dim(xp, d, d + n, axis=axis) == y) & ~taken
        taken = taken | hit
        gp = gp + jnp.pad(jnp.where(hit, g, 0), [(d, k - 1 - d) if a == axis else (0, 0) for a in range(x.ndim)])
    return jax.lax.slice_in_dim(gp, p, p + n, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def maxpool_same(x, k: int):
    """``torch.nn.MaxPool2d(k, stride=1, padding=k // 2)`` on ``(B, H, W, C)``.

    The gradient goes, as in torch, to the first maximum of each window in
    row-major order (ties are the rule after a max-pool: SPPF chains three).
    It is computed as two separable 1-D routings (rows: the first row whose
    row-maximum is the max; then the first column of that row), which is the
    same element, instead of XLA's ``select_and_scatter`` derivative of
    ``reduce_window``: on a CPU that carries four index arrays through a
    variadic window reduction and cost more than the convolutions around it.
    """
    return _maxpool(x, k)


def _maxpool_fwd(x, k):
    return _maxpool(x, k), x


def _maxpool_bwd(k, x, g):
    rows = _maxpool(x, k, axes=(2,))  # max along W: each output row's candidates
    y = _maxpool(rows, k, axes=(1,))
    g_rows = _route_to_first_max(rows, y, g, k, axis=1)
    return (_route_to_first_max(x, rows, g_rows, k, axis=2),)


maxpool_same.defvjp(_maxpool_fwd, _maxpool_bwd)


class SPPF(nnx.Module):
    """Spatial pyramid pooling - fast: ``n`` chained ``k x k`` max-pools (``n =
    3``: SPP(5, 9, 13)), concatenated, fused by ``cv2``.

    ``cv1_act``: yolov5 and every ultralytics yaml row ``SPPF [c2, k]`` give
    ``cv1`` the SiLU (``parse_model`` sets it for rows of at most 3 args);
    YOLO26's row ``SPPF [c2, k, n, shortcut]`` keeps upstream's unactivated
    ``cv1``.  ``shortcut``: add the input when ``c_in == c_out`` (YOLO26).
    """

    def __init__(self, c_in: int, c_out: int, k: int = 5, n: int = 3, *, shortcut: bool = False, cv1_act: bool = True,
                 dtype=None, rngs: nnx.Rngs):
        c_ = c_in // 2
        self.cv1 = ConvBnAct(c_in, c_, 1, act=cv1_act, dtype=dtype, rngs=rngs)
        self.cv2 = ConvBnAct(c_ * (n + 1), c_out, 1, dtype=dtype, rngs=rngs)
        self.k, self.n = k, n
        self.add = shortcut and c_in == c_out

    def __call__(self, x):
        ys = [self.cv1(x)]
        for _ in range(self.n):
            ys.append(maxpool_same(ys[-1], self.k))
        y = self.cv2(jnp.concatenate(ys, axis=-1))
        return y + x if self.add else y


class SCDown(nnx.Module):
    """YOLOv10 ``SCDown(c1, c2, k, s)``: pointwise ``Conv`` to ``c2`` then a
    depthwise ``k x k`` stride-``s`` ``Conv`` without activation."""

    def __init__(self, c1: int, c2: int, k: int, s: int, *, dtype=None, rngs: nnx.Rngs):
        self.cv1 = ConvBnAct(c1, c2, 1, dtype=dtype, rngs=rngs)
        self.cv2 = ConvBnAct(c2, c2, k, s, groups=c2, act=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.cv2(self.cv1(x))


class RepVGGDW(nnx.Module):
    """YOLOv10 ``RepVGGDW(ed)`` in its training form: ``SiLU(dw7x7(x) +
    dw3x3(x))``, both depthwise ``Conv`` without activation (upstream's
    ``fuse()`` folds them into one 7x7 for inference; the sum is the same)."""

    def __init__(self, ed: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv = ConvBnAct(ed, ed, 7, 1, p=3, groups=ed, act=False, dtype=dtype, rngs=rngs)
        self.conv1 = ConvBnAct(ed, ed, 3, 1, p=1, groups=ed, act=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.silu(self.conv(x) + self.conv1(x))


class CIB(nnx.Module):
    """YOLOv10 compact inverted block ``CIB(c1, c2, shortcut, e, lk)``:
    ``cv1`` = dw3x3, 1x1 to ``2 c_``, dw3x3 (or :class:`RepVGGDW` with
    ``lk``), 1x1 to ``c2``, dw3x3, all with SiLU; residual when ``shortcut
    and c1 == c2``."""

    def __init__(self, c1: int, c2: int, *, shortcut: bool = True, e: float = 0.5, lk: bool = False, dtype=None,
                 rngs: nnx.Rngs):
        c_ = int(c2 * e)
        kw = dict(dtype=dtype, rngs=rngs)
        self.cv1 = Sequential([
            ConvBnAct(c1, c1, 3, groups=c1, **kw),
            ConvBnAct(c1, 2 * c_, 1, **kw),
            RepVGGDW(2 * c_, **kw) if lk else ConvBnAct(2 * c_, 2 * c_, 3, groups=2 * c_, **kw),
            ConvBnAct(2 * c_, c2, 1, **kw),
            ConvBnAct(c2, c2, 3, groups=c2, **kw),
        ])
        self.add = shortcut and c1 == c2

    def __call__(self, x):
        return x + self.cv1(x) if self.add else self.cv1(x)


class C2fCIB(C2f):
    """YOLOv10 ``C2fCIB(c1, c2, n, shortcut, lk)``: a C2f whose blocks are
    ``CIB(c, c, shortcut, e=1.0, lk)``."""

    def __init__(self, c1: int, c2: int, n: int = 1, *, shortcut: bool = False, lk: bool = False, e: float = 0.5,
                 dtype=None, rngs: nnx.Rngs):
        super().__init__(c1, c2, n, shortcut=shortcut, e=e, dtype=dtype, rngs=rngs)
        self.m = nnx.List([CIB(self.c, self.c, shortcut=shortcut, e=1.0, lk=lk, dtype=dtype, rngs=rngs) for _ in range(n)])


class PSA(nnx.Module):
    """YOLOv10 ``PSA(c1, c2, e)``: split ``cv1(x)`` in halves ``a, b``; ``b +=
    attn(b)`` (``max(c // 64, 1)`` heads), ``b += ffn(b)``; ``cv2(cat(a, b))``."""

    def __init__(self, c1: int, c2: int, *, e: float = 0.5, dtype=None, rngs: nnx.Rngs):
        if c1 != c2:
            raise ValueError(f"PSA needs c1 == c2, got {c1} and {c2}")
        self.c = int(c1 * e)
        kw = dict(dtype=dtype, rngs=rngs)
        self.cv1 = ConvBnAct(c1, 2 * self.c, 1, **kw)
        self.cv2 = ConvBnAct(2 * self.c, c1, 1, **kw)
        self.attn = Attention(self.c, max(self.c // 64, 1), 0.5, **kw)
        self.ffn = Sequential([ConvBnAct(self.c, 2 * self.c, 1, **kw), ConvBnAct(2 * self.c, self.c, 1, act=False, **kw)])

    def __call__(self, x):
        y = self.cv1(x)
        a, b = y[..., : self.c], y[..., self.c :]
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(jnp.concatenate([a, b], axis=-1))


class YoloxDWConv(nnx.Module):
    """YOLOX ``DWConv``: depthwise ``k x k`` ``BaseConv`` (``dconv``) then a
    pointwise ``BaseConv`` (``pconv``)."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int = 1, *, dtype=None, rngs: nnx.Rngs):
        self.dconv = ConvBnAct(c_in, c_in, k, s, groups=c_in, dtype=dtype, rngs=rngs)
        self.pconv = ConvBnAct(c_in, c_out, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.pconv(self.dconv(x))


def upsample2x(x):
    """Nearest-neighbour 2x upsampling of ``(B, H, W, C)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample(nnx.Module):
    """``nn.Upsample(None, 2, "nearest")``."""

    def __call__(self, x):
        return upsample2x(x)


class Concat(nnx.Module):
    """upstream ``Concat(1)``: channel concatenation of a list of inputs."""

    def __call__(self, xs):
        return jnp.concatenate(xs, axis=-1)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Upstream ``make_divisible``: ``ceil(x / divisor) * divisor``."""
    return int(math.ceil(x / divisor) * divisor)
