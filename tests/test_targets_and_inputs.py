"""Targets (the padded ground-truth format) and bad-input errors of the foundation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxyolo
from jaxyolo import Targets


def _rows():
    return np.array(
        [
            [1, 3, 0.5, 0.5, 0.2, 0.1],
            [0, 0, 0.1, 0.2, 0.05, 0.05],
            [1, 1, 0.9, 0.9, 0.1, 0.2],
            [0, 2, 1.0, 1.0, 0.3, 0.3],
        ],
        np.float32,
    )


def test_from_rows_pads_and_keeps_per_image_order():
    t = Targets.from_rows(_rows(), batch_size=3, max_boxes=4)
    assert t.boxes.shape == (3, 4, 4) and t.classes.shape == (3, 4) and t.mask.shape == (3, 4)
    assert t.boxes.dtype == jnp.float32 and t.classes.dtype == jnp.int32 and t.mask.dtype == jnp.bool_
    np.testing.assert_array_equal(t.mask, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(t.classes[0, :2], [0, 2])
    np.testing.assert_array_equal(t.classes[1, :2], [3, 1])
    np.testing.assert_allclose(t.boxes[1, 1], [0.9, 0.9, 0.1, 0.2])
    np.testing.assert_array_equal(t.boxes[2], np.zeros((4, 4)))  # padded rows are zeros
    # to_rows is the inverse, image by image
    back = t.to_rows()
    np.testing.assert_allclose(back, _rows()[[1, 3, 0, 2]])


def test_from_rows_empty_batch():
    t = Targets.from_rows(np.zeros((0, 6)), batch_size=2, max_boxes=3)
    assert not bool(t.mask.any())
    assert t.to_rows().shape == (0, 6)


def test_too_many_boxes_is_an_error_unless_truncating():
    rows = np.tile(np.array([[0, 1, 0.5, 0.5, 0.1, 0.1]], np.float32), (5, 1))
    with pytest.raises(ValueError, match="max_boxes"):
        Targets.from_rows(rows, batch_size=1, max_boxes=4)
    t = Targets.from_rows(rows, batch_size=1, max_boxes=4, truncate=True)
    assert int(t.mask.sum()) == 4


@pytest.mark.parametrize(
    "rows,kwargs,match",
    [
        (np.zeros((2, 5)), {}, r"\(N, 6\)"),
        ([[3, 0, 0.5, 0.5, 0.1, 0.1]], {}, "batch_size"),
        ([[0, 1.5, 0.5, 0.5, 0.1, 0.1]], {}, "class"),
        ([[0, -1, 0.5, 0.5, 0.1, 0.1]], {}, "class"),
        ([[0, 7, 0.5, 0.5, 0.1, 0.1]], {"nc": 5}, "nc=5"),
        ([[0, 1, 1.5, 0.5, 0.1, 0.1]], {}, r"\[0, 1\]"),
        ([[0, 1, np.nan, 0.5, 0.1, 0.1]], {}, "NaN"),
    ],
)
def test_from_rows_bad_input(rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Targets.from_rows(rows, batch_size=2, max_boxes=4, **kwargs)


def test_targets_is_a_pytree_through_jit_and_vmap():
    t = Targets.from_rows(_rows(), batch_size=3, max_boxes=4)
    leaves = jax.tree_util.tree_leaves(t)
    assert len(leaves) == 3

    @jax.jit
    def count(tt):
        return jnp.sum(tt.mask, axis=1)

    np.testing.assert_array_equal(count(t), [2, 2, 0])
    per_image = jax.vmap(lambda tt: jnp.sum(tt.boxes[:, 2] * tt.mask))(t)
    np.testing.assert_allclose(per_image, [0.35, 0.3, 0.0], rtol=1e-6)


def test_checked_validates_shapes_dtypes_and_concrete_classes():
    t = Targets.from_rows(_rows(), batch_size=3, max_boxes=4)
    assert t.checked(nc=4).boxes.dtype == jnp.float32
    with pytest.raises(ValueError, match="outside"):
        t.checked(nc=3)
    with pytest.raises(TypeError, match="targets.classes"):
        Targets(t.boxes, t.classes.astype(jnp.float32), t.mask).checked()
    with pytest.raises(TypeError, match="targets.boxes"):
        Targets(t.boxes.astype(jnp.int32), t.classes, t.mask).checked()
    with pytest.raises(ValueError, match=r"\(B, M\)"):
        Targets(t.boxes, t.classes[:, :2], t.mask).checked()
    with pytest.raises(ValueError, match="last dimension 4"):
        Targets(t.boxes[..., :3], t.classes, t.mask).checked()
    # Padded rows may hold any class id: only real rows are checked.
    padded_junk = Targets(t.boxes, t.classes.at[2, 3].set(99), t.mask)
    padded_junk.checked(nc=4)


def test_invalid_classes_flags_real_rows_only_under_jit():
    t = Targets.from_rows(_rows(), batch_size=3, max_boxes=4)
    flag = jax.jit(lambda tt: tt.invalid_classes(4))
    assert not bool(flag(t))
    assert bool(flag(Targets(t.boxes, t.classes.at[0, 0].set(4), t.mask)))
    assert not bool(flag(Targets(t.boxes, t.classes.at[2, 0].set(4), t.mask)))  # padded row


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: jaxyolo.bbox_iou(np.zeros((3, 5)), np.zeros((3, 4))), ValueError, "box1 must have last dimension 4"),
        (lambda: jaxyolo.bbox_iou(np.zeros((3, 4)), np.zeros((2, 4))), ValueError, "do not broadcast"),
        (lambda: jaxyolo.bbox_iou(np.zeros((3, 4), np.int32), np.zeros((3, 4))), TypeError, "box1 must be a floating"),
        (lambda: jaxyolo.bbox_iou(np.zeros((3, 4)), np.zeros((3, 4)), kind="eiou"), ValueError, "kind must be one of"),
        (lambda: jaxyolo.bbox_iou(np.zeros((3, 4)), np.zeros((3, 4)), convention="v7"), ValueError, "convention"),
        (lambda: jaxyolo.box_iou_matrix(np.zeros((2, 3, 4)), np.zeros((3, 4))), ValueError, r"boxes1 must have shape \(N, 4\)"),
        (lambda: jaxyolo.dist2bbox(np.zeros((3, 4)), np.zeros((3, 3))), ValueError, "anchor_points"),
        (lambda: jaxyolo.bbox2dist(np.zeros((3, 2)), np.zeros((3, 4), np.int64)), TypeError, "boxes"),
        (lambda: jaxyolo.dfl_loss(np.zeros((3, 4, 16)), np.zeros((3, 5))), ValueError, "pred_dist"),
        (lambda: jaxyolo.yolox_iou_loss(np.zeros((3, 4)), np.zeros((3, 4)), kind="ciou"), ValueError, "kind"),
        (lambda: jaxyolo.bce_with_logits(np.zeros((3, 4)), np.zeros((3, 5))), ValueError, "do not broadcast"),
        (lambda: jaxyolo.focal_loss(np.zeros(3, np.int32), np.zeros(3)), TypeError, "logits"),
        (lambda: jaxyolo.make_anchor_points([(8, 8)], [8, 16]), ValueError, "one entry per level"),
        (lambda: jaxyolo.make_anchor_points([(8, 0)], [8]), ValueError, "W"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_raises_at_trace_time_under_jit():
    f = jax.jit(lambda a, b: jaxyolo.bbox_iou(a, b, kind="ciou"))
    with pytest.raises(ValueError, match="box2 must have last dimension 4"):
        f(jnp.zeros((2, 4)), jnp.zeros((2, 3)))
