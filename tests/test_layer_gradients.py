"""The layers with hand-written gradients (BatchNorm + SiLU, max-pool,
depthwise convolution) against autodiff of their plain formulas and against
torch, and the XLA:CPU compile option the model steps use."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo import _xla
from jaxyolo.models.layers import _conv_general_dilated, _maxpool, batch_norm_train, maxpool_same
from jaxyolo.testing import oracles


def _bn_reference(x, scale, bias, silu, eps=1e-3):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, (0, 1, 2))
    var = jnp.mean(jnp.square(xf - mean), (0, 1, 2))
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + eps)) + bias
    return (jax.nn.silu(y) if silu else y), mean, var


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("through_stats", [False, True])
def test_batch_norm_train_gradients_equal_autodiff(silu, through_stats):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
    cts = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x.shape, (6,), (6,))]

    def objective(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            out = jnp.vdot(y, cts[0])  # a generic cotangent, not just sum(y)
            if through_stats:  # the statistics' own gradients, which the running averages never ask for
                out = out + jnp.vdot(mean, cts[1]) + jnp.vdot(var, cts[2])
            return out
        return f

    ref = jax.grad(objective(lambda *a: _bn_reference(*a, silu)), (0, 1, 2))(x, scale, bias)
    ours = jax.jit(jax.grad(objective(lambda *a: batch_norm_train(*a, eps=1e-3, silu=silu)), (0, 1, 2)))(x, scale, bias)
    for r, o in zip(ref, ours):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))
    # the value is the reference formula's, bit for bit
    for r, o in zip(_bn_reference(x, scale, bias, silu), batch_norm_train(x, scale, bias, eps=1e-3, silu=silu)):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(r))


def test_batch_norm_train_matches_torch_and_keeps_bf16():
    torch = oracles.torch()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32) * 2 - 0.5
    g = rng.standard_normal(x.shape).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    bn = torch.nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale))
        bn.bias.copy_(torch.from_numpy(bias))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    ty = torch.nn.functional.silu(bn.train()(tx))
    ty.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    y, vjp = jax.vjp(lambda x, s, b: batch_norm_train(x, s, b, eps=1e-3, silu=True)[0], x, scale, bias)
    gx, gs, gb = vjp(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gs), bn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), bn.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    gxb = jax.grad(lambda x: jnp.sum(batch_norm_train(x, scale, bias, silu=True)[0]))(xb)
    assert gxb.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(gxb)))


@pytest.mark.parametrize("k", [3, 5, 9, 13])
@pytest.mark.parametrize("chain", [1, 3])
def test_maxpool_gradient_goes_to_torchs_argmax_on_ties(k, chain):
    """Integer inputs make ties the rule (and a chained pool, as in SPPF, ties
    every window after the first): each gradient must land on the cell torch's
    max_pool2d picks, the first maximum in row-major window order."""
    torch = oracles.torch()
    rng = np.random.default_rng(k * 10 + chain)
    x = rng.integers(0, 4, (2, 11, 9, 3)).astype(np.float32)

    def chained(pool, x):
        y, out = x, 0.0
        for _ in range(chain):
            y = pool(y)
            out = out + y
        return out

    g = rng.standard_normal(x.shape).astype(np.float32)
    y, vjp = jax.vjp(lambda x: chained(lambda v: maxpool_same(v, k), x), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(chained(lambda v: _maxpool(v, k), jnp.asarray(x))))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    chained(lambda v: torch.nn.functional.max_pool2d(v, k, 1, k // 2), tx).backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    ours = np.asarray(vjp(jnp.asarray(g))[0])
    np.testing.assert_allclose(ours, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    # a wrong tie rule moves whole gradients: the largest error would be O(1), not rounding
    assert np.abs(ours).max() > 1.0


@pytest.mark.parametrize("h, c, k, s", [(9, 5, 3, 1), (10, 4, 3, 2), (11, 3, 5, 2), (8, 6, 1, 1), (12, 7, 5, 1)])
def test_depthwise_conv_equals_xla_grouped_conv(h, c, k, s):
    rng = np.random.default_rng(h)
    x = jnp.asarray(rng.standard_normal((2, h, h + 1, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
    args = ((s, s), ((k // 2, k // 2), (k // 2, k // 2)))
    dn = ("NHWC", "HWIO", "NHWC")

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dn, feature_group_count=c)

    def ours(x, w):
        return _conv_general_dilated(x, w, *args, dimension_numbers=dn, feature_group_count=c)

    assert "convolution" not in jax.jit(ours).lower(x, w).as_text()  # the shifted sum, not a grouped conv
    y0, vjp0 = jax.vjp(ref, x, w)
    y1, vjp1 = jax.vjp(ours, x, w)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(y0.shape), jnp.float32)
    for a, b in zip(vjp1(g), vjp0(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_cpu_compiler_options_keep_convolutions_off_ynnpack(monkeypatch):
    x = jnp.ones((2, 16, 16, 8))
    w = jnp.ones((3, 3, 8, 8))

    def f(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    options = _xla.compiler_options("cpu")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    hlo = jax.jit(f, compiler_options=options).lower(x, w).compile().as_text()
    assert re.search(r"= f32\[2,16,16,8\]\S* convolution\(", hlo), "the convolution runs as XLA's own (Eigen) op"
    assert _xla.compiler_options("gpu") is None and _xla.compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
    assert _xla.compiler_options("cpu") is None  # the user's own setting wins
