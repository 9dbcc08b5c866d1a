"""Hypothesis property tests for the IoU family: ranges, symmetry, invariances,
and finite gradients everywhere (degenerate boxes included)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jaxyolo
from jaxyolo.boxes import CONVENTIONS

KINDS = ("iou", "giou", "diou", "ciou")
# Jitted once per static combination: hypothesis then only pays for execution.
_iou = jax.jit(partial(jaxyolo.bbox_iou, xywh=False), static_argnames=("xywh", "kind", "eps", "convention"))  # xyxy

_coord = st.floats(-50, 50, width=32, allow_nan=False, allow_infinity=False)
_size = st.floats(0.0, 60, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def xyxy_boxes(draw, n=8, allow_degenerate=True):
    """(n, 4) valid xyxy boxes; with allow_degenerate some have zero width/height or are all zero."""
    xy = draw(arrays(np.float32, (n, 2), elements=_coord))
    wh = draw(arrays(np.float32, (n, 2), elements=_size if allow_degenerate else st.floats(0.5, 60, width=32)))
    boxes = np.concatenate([xy, xy + wh], 1)
    if allow_degenerate and draw(st.booleans()):
        boxes[draw(st.integers(0, n - 1))] = 0.0  # a padded row
    return boxes


@given(xyxy_boxes(), xyxy_boxes(), st.sampled_from(CONVENTIONS))
def test_iou_in_unit_interval_and_symmetric(a, b, convention):
    iou_ab = np.asarray(_iou(a, b, convention=convention))
    iou_ba = np.asarray(_iou(b, a, convention=convention))
    assert np.all((iou_ab >= 0) & (iou_ab <= 1))
    np.testing.assert_allclose(iou_ab, iou_ba, rtol=1e-6, atol=1e-7)


@given(xyxy_boxes(allow_degenerate=False), xyxy_boxes(allow_degenerate=False), st.floats(0.25, 8.0))
def test_iou_family_is_scale_invariant(a, b, scale):
    """Scaling both boxes leaves every kind unchanged (eps is negligible at these sizes)."""
    for kind in KINDS:
        ref = _iou(a, b, kind=kind)
        scaled = _iou(a * np.float32(scale), b * np.float32(scale), kind=kind)
        np.testing.assert_allclose(scaled, ref, rtol=2e-4, atol=2e-5)


@given(xyxy_boxes(allow_degenerate=False), xyxy_boxes(allow_degenerate=False), _coord, _coord)
def test_iou_family_is_translation_invariant(a, b, dx, dy):
    shift = np.array([dx, dy, dx, dy], np.float32)
    for kind in KINDS:
        ref = _iou(a, b, kind=kind)
        moved = _iou(a + shift, b + shift, kind=kind)
        np.testing.assert_allclose(moved, ref, rtol=1e-4, atol=1e-4)


@given(xyxy_boxes(allow_degenerate=False), xyxy_boxes(allow_degenerate=False), st.sampled_from(CONVENTIONS))
def test_penalised_ious_are_below_iou(a, b, convention):
    """GIoU/DIoU/CIoU <= IoU.  Only for non-degenerate boxes: with a zero-size box,
    upstream's eps placement (eps in the height *and* the union, but only once in
    the enclosing area) makes GIoU exceed IoU by ~eps/area -- reproduced, not fixed."""
    iou = np.asarray(_iou(a, b, convention=convention))
    for kind in ("giou", "diou", "ciou"):
        other = np.asarray(_iou(a, b, kind=kind, convention=convention))
        assert np.all(other <= iou + 1e-6), kind
        # GIoU, DIoU >= -1; CIoU = DIoU - v^2 / (v - IoU + 1) with v in [0, 1)
        # goes down to -1.5 (IoU 0, far apart, aspect ratios far apart)
        assert np.all(other >= (-1.5 if kind == "ciou" else -1) - 1e-6), kind
    ciou = np.asarray(_iou(a, b, kind="ciou", convention=convention))
    diou = np.asarray(_iou(a, b, kind="diou", convention=convention))
    assert np.all(ciou <= diou + 1e-6)


@jax.jit
def _tiny_boxes_grad(a, b):
    return jax.grad(lambda x: jnp.sum(jaxyolo.bbox_iou(x, b, kind="ciou", xywh=True)))(a)


def test_ciou_gradients_finite_for_tiny_boxes():
    """h**2 underflows for sizes ~1e-29: the textbook atan(w/h) gradient is inf there."""
    a = np.zeros((2, 4), np.float32)
    b = np.full((2, 4), 5.6955015e-29, np.float32)
    assert np.all(np.isfinite(_tiny_boxes_grad(a, b)))
    assert np.all(np.isfinite(_tiny_boxes_grad(b, a)))
    assert np.all(np.isfinite(_tiny_boxes_grad(b * 3, b)))


@partial(jax.jit, static_argnames=("kind", "convention", "xywh"))
def _iou_value_and_grad(a, b, *, kind, convention, xywh):
    return jax.value_and_grad(
        lambda x, y: jnp.sum(jaxyolo.bbox_iou(x, y, kind=kind, convention=convention, xywh=xywh)), (0, 1)
    )(a, b)


@given(
    arrays(np.float32, (6, 4), elements=st.floats(-30, 30, width=32)),
    arrays(np.float32, (6, 4), elements=st.floats(-30, 30, width=32)),
    st.sampled_from(KINDS),
    st.sampled_from(CONVENTIONS),
    st.booleans(),
)
def test_gradients_finite_for_arbitrary_raw_boxes(a, b, kind, convention, xywh):
    """Raw predictions: negative widths/heights, zero sizes, identical boxes, anything."""
    a[0] = b[0]  # an identical pair
    a[1] = 0.0  # a padded row
    value, grads = _iou_value_and_grad(a, b, kind=kind, convention=convention, xywh=xywh)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grads[0])) and np.all(np.isfinite(grads[1]))


@partial(jax.jit, static_argnames=("kind",))
def _yolox_grad(pred, target, *, kind):
    return jax.grad(lambda p: jnp.sum(jaxyolo.yolox_iou_loss(p, target, kind=kind)))(pred)


@given(
    arrays(np.float32, (5, 4), elements=st.floats(-30, 30, width=32)),
    arrays(np.float32, (5, 4), elements=st.floats(-30, 30, width=32)),
    st.sampled_from(("iou", "giou")),
)
def test_yolox_iou_loss_gradients_finite(pred, target, kind):
    pred[0] = 0.0
    target[1] = 0.0
    grad = _yolox_grad(pred, target, kind=kind)
    assert np.all(np.isfinite(grad))


_dfl_value_and_grad = jax.jit(jax.value_and_grad(lambda p, t: jnp.sum(jaxyolo.dfl_loss(p, t))))


@given(arrays(np.float32, (4, 4, 16), elements=st.floats(-20, 20, width=32)), arrays(np.float32, (4, 4), elements=st.floats(-5, 25, width=32)))
def test_dfl_finite_and_nonnegative(pred, target):
    value, grad = _dfl_value_and_grad(pred, target)
    assert np.isfinite(value) and value >= 0
    assert np.all(np.isfinite(grad))
