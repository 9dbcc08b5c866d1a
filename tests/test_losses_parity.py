"""jaxyolo.losses against the upstream loss classes: values and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, VALUE_TOL

import jaxyolo
from jaxyolo import losses as L


def _logits_and_targets(rng, shape=(32, 7), soft=False):
    x = rng.normal(0, 3, shape).astype(np.float32)
    x[0, :3] = [0.0, 40.0, -40.0]  # exact zero and saturated logits
    if soft:
        t = rng.uniform(0, 1, shape).astype(np.float32)
    else:
        t = (rng.uniform(0, 1, shape) < 0.3).astype(np.float32)
    return x, t


def _torch_value_grad(oracles, fn, x, *others):
    tx = oracles.tensor(x, grad=True)
    out = fn(tx, *[oracles.tensor(o) for o in others])
    out.sum().backward()
    return oracles.numpy(out), oracles.numpy(tx.grad)


def _jax_value_grad(fn, x, *others):
    value = fn(x, *others)
    grad = jax.grad(lambda z: jnp.sum(fn(z, *others)))(x)
    return np.asarray(value), np.asarray(grad)


def _check(ours, ref):
    np.testing.assert_allclose(ours[0], ref[0], **VALUE_TOL)
    np.testing.assert_allclose(ours[1], ref[1], **GRAD_TOL)


@pytest.mark.parametrize("pos_weight", [None, 1.0, 2.5])
@pytest.mark.parametrize("soft", [False, True])
def test_bce_with_logits_matches_torch(oracles, rng, pos_weight, soft):
    torch = oracles.torch()
    x, t = _logits_and_targets(rng, soft=soft)
    pw = None if pos_weight is None else torch.tensor([pos_weight])
    ref = _torch_value_grad(oracles, torch.nn.BCEWithLogitsLoss(pos_weight=pw, reduction="none"), x, t)
    _check(_jax_value_grad(lambda z, tt: L.bce_with_logits(z, tt, pos_weight=pos_weight), x, t), ref)


def test_bce_with_logits_target_gradient_matches_torch(oracles, rng):
    """Soft targets can carry gradient (e.g. varifocal's gt_score); match torch there too."""
    torch = oracles.torch()
    x, t = _logits_and_targets(rng, soft=True)
    tt = oracles.tensor(t, grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(oracles.tensor(x), tt, reduction="sum").backward()
    g = jax.grad(lambda q: L.bce_with_logits(x, q).sum())(t)
    np.testing.assert_allclose(g, oracles.numpy(tt.grad), **GRAD_TOL)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.2])
def test_smooth_bce_matches_yolov5(oracles, eps):
    v5loss = oracles.yolov5_modules()[0]
    assert jaxyolo.smooth_bce(eps) == v5loss.smooth_BCE(eps)
    assert L.smooth_bce() == v5loss.smooth_BCE()


@pytest.mark.parametrize("gamma,alpha", [(1.5, 0.25), (2.0, 0.5), (0.5, 0.75)])
@pytest.mark.parametrize("pos_weight", [1.0, 3.0])
@pytest.mark.parametrize("cls", ["FocalLoss", "QFocalLoss"])
def test_yolov5_focal_variants_match(oracles, rng, gamma, alpha, pos_weight, cls):
    """yolov5 wraps BCEWithLogitsLoss(pos_weight) in (Q)FocalLoss; reduction 'mean' == .mean()."""
    torch = oracles.torch()
    v5loss = oracles.yolov5_modules()[0]
    x, t = _logits_and_targets(rng, soft=cls == "QFocalLoss")
    crit = getattr(v5loss, cls)(torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight])), gamma, alpha)
    ref = _torch_value_grad(oracles, crit, x, t)
    fn = L.focal_loss if cls == "FocalLoss" else L.qfocal_loss
    ours = _jax_value_grad(lambda z, tt: fn(z, tt, gamma=gamma, alpha=alpha, pos_weight=pos_weight).mean(), x, t)
    _check(ours, ref)


@pytest.mark.parametrize("gamma,alpha", [(1.5, 0.25), (2.0, 0.0)])
def test_ultralytics_focal_loss_matches(oracles, rng, gamma, alpha):
    """ultralytics FocalLoss reduces .mean(1).sum() and skips alpha when alpha <= 0."""
    uloss = oracles.ultralytics_modules()[0]
    x, t = _logits_and_targets(rng)
    ref = _torch_value_grad(oracles, uloss.FocalLoss(gamma=gamma, alpha=alpha), x, t)
    ours = _jax_value_grad(lambda z, tt: L.focal_loss(z, tt, gamma=gamma, alpha=alpha).mean(1).sum(), x, t)
    _check(ours, ref)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_bce_blur_matches_yolov5(oracles, rng, alpha):
    v5loss = oracles.yolov5_modules()[0]
    x, t = _logits_and_targets(rng)
    ref = _torch_value_grad(oracles, v5loss.BCEBlurWithLogitsLoss(alpha), x, t)
    _check(_jax_value_grad(lambda z, tt: L.bce_blur_loss(z, tt, alpha=alpha).mean(), x, t), ref)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.75), (1.5, 0.5)])
def test_varifocal_matches_ultralytics(oracles, rng, gamma, alpha):
    uloss = oracles.ultralytics_modules()[0]
    x = rng.normal(0, 2, (3, 20, 5)).astype(np.float32)
    label = np.zeros((3, 20, 5), np.float32)
    label[np.arange(3)[:, None], np.arange(20)[None], rng.integers(0, 5, (3, 20))] = 1.0
    label[:, ::3] = 0.0  # background anchors
    score = (label * rng.uniform(0.05, 1, label.shape)).astype(np.float32)
    crit = uloss.VarifocalLoss(gamma=gamma, alpha=alpha)
    ref = _torch_value_grad(oracles, lambda p, s, lab: crit(p, s, lab), x, score, label)
    ours = _jax_value_grad(
        lambda z, s, lab: L.varifocal_loss(z, s, lab, alpha=alpha, gamma=gamma).mean(1).sum(), x, score, label
    )
    _check(ours, ref)


@pytest.mark.parametrize("reg_max", [16, 8])
def test_dfl_matches_ultralytics(oracles, rng, reg_max):
    uloss = oracles.ultralytics_modules()[0]
    n = 25
    pred = rng.normal(0, 2, (n * 4, reg_max)).astype(np.float32)
    target = rng.uniform(0, reg_max - 1, (n, 4)).astype(np.float32)
    target[0] = [0.0, reg_max - 1, reg_max + 3, 2.0]  # bin edge, beyond the clamp, integer
    tp = oracles.tensor(pred, grad=True)
    ref = uloss.DFLoss(reg_max)(tp, oracles.tensor(target))  # (n, 1): mean over the 4 sides
    ref.sum().backward()

    def ours(p):
        return L.dfl_loss(p.reshape(n, 4, reg_max), target).mean(-1, keepdims=True)

    np.testing.assert_allclose(ours(pred), oracles.numpy(ref), **VALUE_TOL)
    np.testing.assert_allclose(jax.grad(lambda p: ours(p).sum())(pred), oracles.numpy(tp.grad), **GRAD_TOL)


@pytest.mark.parametrize("kind", ["iou", "giou"])
def test_yolox_iou_loss_matches(oracles, rng, kind):
    ylosses = oracles.yolox_modules()[1]
    n = 40
    target = np.concatenate([rng.uniform(20, 100, (n, 2)), rng.uniform(4, 60, (n, 2))], 1).astype(np.float32)
    pred = target + rng.normal(0, 8, (n, 4)).astype(np.float32)
    pred[:, 2:] = np.abs(pred[:, 2:]) + 1
    pred[:4] = [[500, 500, 10, 10]] * 4  # disjoint: en mask zero
    pred[4] = target[4]  # identical
    ref = _torch_value_grad(oracles, ylosses.IOUloss(reduction="none", loss_type=kind), pred, target)
    _check(_jax_value_grad(lambda p, t: L.yolox_iou_loss(p, t, kind=kind), pred, target), ref)


def test_masked_reductions_ignore_nan_in_masked_entries():
    loss = jnp.array([1.0, 3.0, jnp.nan, jnp.inf])
    mask = jnp.array([True, True, False, False])
    assert float(L.masked_sum(loss, mask)) == 4.0
    assert float(L.masked_mean(loss, mask)) == 2.0
    assert float(L.masked_mean(loss, jnp.zeros(4, bool))) == 0.0
    g = jax.grad(lambda x: L.masked_mean(x, mask))(loss)
    np.testing.assert_array_equal(g, [0.5, 0.5, 0.0, 0.0])


def test_losses_compute_in_float32_for_bf16(rng):
    x, t = _logits_and_targets(rng)
    for fn in (L.bce_with_logits, L.focal_loss, L.qfocal_loss, L.bce_blur_loss):
        out = fn(jnp.asarray(x, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
        assert out.dtype == jnp.float32
    out = L.dfl_loss(jnp.zeros((3, 16), jnp.bfloat16), jnp.ones(3, jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.full(3, np.log(16.0)), rtol=1e-6)


def test_reduce_names_the_argument():
    with pytest.raises(ValueError, match="reduction"):
        L.reduce(jnp.ones(3), "average")
    assert float(L.reduce(jnp.arange(4.0), "sum")) == 6.0
    assert float(L.reduce(jnp.arange(4.0), "mean")) == 1.5


class ElementLossVariantsTest(chex.TestCase):
    """Every element loss gives the same numbers with and without jit: each variant is
    compared with the *other* mode (the jitted variant with an eager run under
    ``jax.disable_jit``, the eager variant with ``jax.jit``), and each variant is checked
    to be the mode it claims (a jitted function traces once for two calls)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_agree(self):
        rng = np.random.default_rng(7)
        x = rng.normal(0, 2, (6, 5)).astype(np.float32)
        t = rng.uniform(0, 1, (6, 5)).astype(np.float32)
        label = (t > 0.5).astype(np.float32)
        boxes = np.concatenate([rng.uniform(10, 50, (6, 2)), rng.uniform(2, 20, (6, 2))], 1).astype(np.float32)
        cases = {
            "bce": (lambda a, b: L.bce_with_logits(a, b, pos_weight=2.0), (x, t)),
            "focal": (lambda a, b: L.focal_loss(a, b), (x, label)),
            "qfocal": (lambda a, b: L.qfocal_loss(a, b), (x, t)),
            "blur": (lambda a, b: L.bce_blur_loss(a, b), (x, label)),
            "vfl": (lambda a, b: L.varifocal_loss(a, b * label, label), (x, t)),
            "dfl": (lambda a, b: L.dfl_loss(a.reshape(6, 5, 1) * jnp.ones(4), b * 3), (x, t)),
            "yolox": (lambda a, b: L.yolox_iou_loss(a, b, kind="giou"), (boxes, boxes[::-1])),
        }
        jitted = self.variant.type == chex.ChexVariantType.WITH_JIT
        for name, (fn, args) in cases.items():
            calls = []

            def counted(*a, fn=fn):
                calls.append(1)
                return fn(*a)

            variant = self.variant(counted)
            out = variant(*args)
            variant(*args)
            assert len(calls) == (1 if jitted else 2), name  # traced once vs run twice
            if jitted:
                with jax.disable_jit():
                    other = fn(*args)
            else:
                other = jax.jit(fn)(*args)
            np.testing.assert_allclose(out, other, rtol=1e-6, atol=1e-7, err_msg=name)
            assert np.all(np.isfinite(out)), name
