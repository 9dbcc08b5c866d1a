"""jaxyolo.boxes against the upstream functions themselves: values and gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, VALUE_TOL

import jaxyolo
from jaxyolo import boxes as B

KINDS = ("iou", "giou", "diou", "ciou")


def _rand_xyxy(rng, n, lo=0.0, hi=10.0):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(0.1, 5.0, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _edge_pairs_xyxy():
    """Degenerate and boundary pairs: identical, disjoint, touching, nested,
    zero width, zero height, zero area, padded zeros, negative widths."""
    pairs = [
        ([0, 0, 2, 2], [0, 0, 2, 2]),  # identical
        ([0, 0, 1, 1], [5, 5, 6, 7]),  # disjoint
        ([0, 0, 1, 1], [1, 0, 2, 1]),  # touching edge (intersection width exactly 0)
        ([0, 0, 4, 4], [1, 1, 2, 3]),  # nested
        ([0, 0, 0, 2], [0, 0, 1, 1]),  # zero width
        ([0, 0, 2, 0], [0, 0, 1, 1]),  # zero height
        ([1, 1, 1, 1], [0, 0, 2, 2]),  # zero area inside
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # padded zeros
        ([0, 0, 0, 0], [1, 2, 3, 4]),  # padded vs real
        ([2, 2, 1, 3], [0, 0, 3, 3]),  # negative width (raw prediction)
        ([2, 3, 4, 1], [0, 0, 3, 3]),  # negative height
        ([1, 1, 1, 1], [1, 1, 1, 1]),  # two identical points
        ([0, 0, 1e-9, 1e-9], [0, 0, 1, 1]),  # sides far below eps (where the yolov5 and YOLOv9 heights differ)
        ([0, 0, 1, 1e-9], [0, 0, 1, 1]),  # height far below eps
        ([0, 0, 1e-9, 1], [0, 0, 1, 1]),  # width far below eps
        ([0, 0, 2, 5e-8], [0, 1e-8, 3, 1e-7]),  # two flat boxes, heights below eps
    ]
    a, b = zip(*pairs)
    return np.array(a, np.float32), np.array(b, np.float32)


def _upstream_iou(mod, a, b, *, xywh, kind, oracles):
    ta, tb = oracles.tensor(a, grad=True), oracles.tensor(b, grad=True)
    out = mod.bbox_iou(ta, tb, xywh=xywh, GIoU=kind == "giou", DIoU=kind == "diou", CIoU=kind == "ciou")
    out.sum().backward()
    return oracles.numpy(out)[..., 0], oracles.numpy(ta.grad), oracles.numpy(tb.grad)


def _ours(a, b, *, xywh, kind, convention):
    def f(x, y):
        return jaxyolo.bbox_iou(x, y, xywh=xywh, kind=kind, convention=convention)

    value = f(a, b)
    ga, gb = jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(a, b)
    return np.asarray(value), np.asarray(ga), np.asarray(gb)


def _upstream_module(oracles, convention):
    """The module whose ``bbox_iou`` defines ``convention``."""
    if convention == "yolov5":
        return oracles.yolov5_modules()[1]
    if convention == "yolov9":
        return oracles.yolov9_modules()[2]
    return oracles.ultralytics_modules()[2]


@pytest.mark.parametrize("convention", jaxyolo.boxes.CONVENTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xywh", [False, True])
def test_bbox_iou_matches_upstream_random(oracles, rng, convention, kind, xywh):
    a, b = _rand_xyxy(rng, 64), _rand_xyxy(rng, 64)
    b[::4] = a[::4] + rng.uniform(-0.3, 0.3, (16, 4)).astype(np.float32)  # strongly overlapping pairs
    if xywh:
        a, b = np.asarray(B.xyxy2xywh(a)), np.asarray(B.xyxy2xywh(b))
    ref, ref_ga, ref_gb = _upstream_iou(_upstream_module(oracles, convention), a, b, xywh=xywh, kind=kind, oracles=oracles)
    val, ga, gb = _ours(a, b, xywh=xywh, kind=kind, convention=convention)
    np.testing.assert_allclose(val, ref, **VALUE_TOL)
    np.testing.assert_allclose(ga, ref_ga, **GRAD_TOL)
    np.testing.assert_allclose(gb, ref_gb, **GRAD_TOL)


@pytest.mark.parametrize("convention", jaxyolo.boxes.CONVENTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xywh", [False, True])
def test_bbox_iou_edge_cases(oracles, convention, kind, xywh):
    """Where upstream is finite we match it; everywhere we are finite (values and grads)."""
    a, b = _edge_pairs_xyxy()
    if xywh:  # corners -> centre/size, keeping the degenerate sizes
        a = np.concatenate([(a[:, :2] + a[:, 2:]) / 2, a[:, 2:] - a[:, :2]], 1)
        b = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
    ref, ref_ga, ref_gb = _upstream_iou(_upstream_module(oracles, convention), a, b, xywh=xywh, kind=kind, oracles=oracles)
    val, ga, gb = _ours(a, b, xywh=xywh, kind=kind, convention=convention)
    assert np.all(np.isfinite(val)) and np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    ok = np.isfinite(ref) & np.all(np.isfinite(ref_ga), 1) & np.all(np.isfinite(ref_gb), 1)
    # Upstream must be finite on the well-posed pairs; the NaN cases are zero-size boxes in xywh CIoU.
    assert ok[:4].all()
    np.testing.assert_allclose(val[ok], ref[ok], **VALUE_TOL)
    np.testing.assert_allclose(ga[ok], ref_ga[ok], **GRAD_TOL)
    np.testing.assert_allclose(gb[ok], ref_gb[ok], **GRAD_TOL)


@pytest.mark.parametrize("convention", B.CONVENTIONS)
def test_bbox_iou_default_format_is_upstreams(oracles, rng, convention):
    """Called without ``xywh``, jaxyolo and every upstream ``bbox_iou`` read the boxes the same
    way (cxcywh): code ported from upstream gets upstream's numbers."""
    a, b = (np.array(B.xyxy2xywh(_rand_xyxy(rng, 32))) for _ in range(2))
    b[::2] = a[::2] + rng.uniform(-0.3, 0.3, (16, 4)).astype(np.float32)  # overlapping pairs
    mod = _upstream_module(oracles, convention)
    ref = oracles.numpy(mod.bbox_iou(oracles.tensor(a), oracles.tensor(b), CIoU=True))[..., 0]
    ours = np.asarray(jaxyolo.bbox_iou(a, b, kind="ciou", convention=convention))
    np.testing.assert_allclose(ours, ref, **VALUE_TOL)
    as_corners = np.asarray(jaxyolo.bbox_iou(a, b, xywh=False, kind="ciou", convention=convention))
    assert np.abs(as_corners - ref).max() > 0.1  # the format matters on these boxes


def test_bbox_iou_broadcasts_like_upstream(oracles, rng):
    gt = _rand_xyxy(rng, 6).reshape(2, 3, 1, 4)
    pd = _rand_xyxy(rng, 10).reshape(2, 1, 5, 4)
    mod = oracles.ultralytics_modules()[2]
    ref = oracles.numpy(mod.bbox_iou(oracles.tensor(gt), oracles.tensor(pd), xywh=False, CIoU=True))[..., 0]
    ours = jaxyolo.bbox_iou(gt, pd, xywh=False, kind="ciou")
    assert ours.shape == (2, 3, 5)
    np.testing.assert_allclose(ours, ref, **VALUE_TOL)


def test_bbox_iou_conventions_differ_where_documented(oracles):
    """yolov5 clamps h to eps, ultralytics and YOLOv9 add eps: a height below eps
    tells them apart, and each convention matches its own upstream there."""
    a = np.array([[0.0, 0.0, 1.0, 0.05]], np.float32)  # height 0.05 < eps = 0.1
    b = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
    got = {c: np.asarray(jaxyolo.bbox_iou(a, b, xywh=False, kind="iou", eps=0.1, convention=c)) for c in B.CONVENTIONS}
    assert abs(got["yolov5"][0] - got["ultralytics"][0]) > 1e-3
    assert abs(got["yolov5"][0] - got["yolov9"][0]) > 1e-3
    for conv in B.CONVENTIONS:
        mod = _upstream_module(oracles, conv)
        ref = oracles.numpy(mod.bbox_iou(oracles.tensor(a), oracles.tensor(b), xywh=False, eps=0.1))[..., 0]
        np.testing.assert_allclose(got[conv], ref, **VALUE_TOL)


def test_yolov9_convention_is_yolov9s_not_yolov5s(oracles):
    """YOLOv9's ``bbox_iou`` adds eps to the height like ultralytics, not yolov5's clamp:
    on boxes with sides below eps (default eps) the yolov5 convention misses YOLOv9's
    CIoU and its gradient by far more than the parity tolerance; "yolov9" matches."""
    a, b = _edge_pairs_xyxy()
    tiny = slice(-4, None)  # the sub-eps pairs
    ref, ref_ga, ref_gb = _upstream_iou(_upstream_module(oracles, "yolov9"), a[tiny], b[tiny], xywh=False, kind="ciou",
                                        oracles=oracles)
    v9 = _ours(a[tiny], b[tiny], xywh=False, kind="ciou", convention="yolov9")
    v5 = _ours(a[tiny], b[tiny], xywh=False, kind="ciou", convention="yolov5")
    np.testing.assert_allclose(v9[0], ref, **VALUE_TOL)
    np.testing.assert_allclose(v9[1], ref_ga, **GRAD_TOL)
    np.testing.assert_allclose(v9[2], ref_gb, **GRAD_TOL)
    assert np.max(np.abs(v5[0] - ref) / np.abs(ref)) > 1e-3
    assert np.max(np.abs(v5[1] - ref_ga)) > 1e-2


@pytest.mark.parametrize("flavour", ["yolov5", "ultralytics"])
def test_box_iou_matrix_matches_upstream(oracles, rng, flavour):
    a, b = _rand_xyxy(rng, 7), _rand_xyxy(rng, 9)
    if flavour == "yolov5":
        fn = oracles.yolov5_modules()[1].box_iou
    else:
        fn = oracles.ultralytics_modules()[2].box_iou
    ta, tb = oracles.tensor(a, grad=True), oracles.tensor(b, grad=True)
    ref = fn(ta, tb)
    ref.sum().backward()
    ours = jaxyolo.box_iou_matrix(a, b)
    ga, gb = jax.grad(lambda x, y: jaxyolo.box_iou_matrix(x, y).sum(), (0, 1))(a, b)
    np.testing.assert_allclose(ours, oracles.numpy(ref), **VALUE_TOL)
    np.testing.assert_allclose(ga, oracles.numpy(ta.grad), **GRAD_TOL)
    np.testing.assert_allclose(gb, oracles.numpy(tb.grad), **GRAD_TOL)


@pytest.mark.parametrize("xyxy", [True, False])
def test_yolox_bboxes_iou_matches_upstream(oracles, rng, xyxy):
    a, b = _rand_xyxy(rng, 8), _rand_xyxy(rng, 11)
    b[:3] = a[:3] + 0.25  # overlaps
    if not xyxy:
        a, b = np.asarray(B.xyxy2xywh(a)), np.asarray(B.xyxy2xywh(b))
    ta, tb = oracles.tensor(a, grad=True), oracles.tensor(b, grad=True)
    ref = oracles.yolox_modules()[2].bboxes_iou(ta, tb, xyxy=xyxy)
    ref.sum().backward()
    ours = jaxyolo.yolox_bboxes_iou(a, b, xyxy=xyxy)
    ga, gb = jax.grad(lambda x, y: jaxyolo.yolox_bboxes_iou(x, y, xyxy=xyxy).sum(), (0, 1))(a, b)
    np.testing.assert_allclose(ours, oracles.numpy(ref), **VALUE_TOL)
    np.testing.assert_allclose(ga, oracles.numpy(ta.grad), **GRAD_TOL)
    np.testing.assert_allclose(gb, oracles.numpy(tb.grad), **GRAD_TOL)


def test_yolox_bboxes_iou_zero_area_pairs_are_zero_not_nan():
    z = np.zeros((2, 4), np.float32)
    out = jaxyolo.yolox_bboxes_iou(z, z)
    np.testing.assert_array_equal(out, np.zeros((2, 2)))
    g = jax.grad(lambda x: jaxyolo.yolox_bboxes_iou(x, z).sum())(z)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("shapes,strides,offset", [([(8, 8), (4, 4), (2, 2)], [8, 16, 32], 0.5), ([(6, 10), (3, 5)], [16, 32], 0.0)])
def test_make_anchor_points_matches_upstream(oracles, shapes, strides, offset):
    torch = oracles.torch()
    tal = oracles.ultralytics_modules()[1]
    feats = [torch.zeros(1, 3, h, w) for h, w in shapes]
    ref_pts, ref_stride = tal.make_anchors(feats, strides, grid_cell_offset=offset)
    pts, stride = jaxyolo.make_anchor_points(shapes, strides, offset=offset)
    assert pts.dtype == jnp.float32 and stride.shape == (pts.shape[0], 1)
    np.testing.assert_array_equal(pts, oracles.numpy(ref_pts))
    np.testing.assert_array_equal(stride, oracles.numpy(ref_stride))


@pytest.mark.parametrize("xywh", [True, False])
def test_dist2bbox_matches_upstream(oracles, rng, xywh):
    tal = oracles.ultralytics_modules()[1]
    dist = rng.uniform(0, 8, (2, 30, 4)).astype(np.float32)
    pts = rng.uniform(0, 20, (30, 2)).astype(np.float32)
    td = oracles.tensor(dist, grad=True)
    ref = tal.dist2bbox(td, oracles.tensor(pts), xywh=xywh, dim=-1)
    ref.pow(2).sum().backward()
    ours = jaxyolo.dist2bbox(dist, pts, xywh=xywh)
    g = jax.grad(lambda d: (jaxyolo.dist2bbox(d, pts, xywh=xywh) ** 2).sum())(dist)
    np.testing.assert_allclose(ours, oracles.numpy(ref), **VALUE_TOL)
    np.testing.assert_allclose(g, oracles.numpy(td.grad), **GRAD_TOL)


@pytest.mark.parametrize("reg_max", [None, 15, 7])
def test_bbox2dist_matches_upstream_including_clamp(oracles, rng, reg_max):
    tal = oracles.ultralytics_modules()[1]
    pts = rng.uniform(0, 20, (40, 2)).astype(np.float32)
    boxes = _rand_xyxy(rng, 40, hi=20) * np.float32(1.5)
    boxes[:5] = [[0, 0, 40, 40]] * 5  # far sides: clamped at reg_max - 0.01
    boxes[5:8] = np.concatenate([pts[5:8] + 1, pts[5:8] + 2], 1)  # anchor outside: negative side, clamped at 0
    ref = tal.bbox2dist(oracles.tensor(pts), oracles.tensor(boxes), reg_max)
    ours = jaxyolo.bbox2dist(pts, boxes, reg_max)
    np.testing.assert_allclose(ours, oracles.numpy(ref), **VALUE_TOL)
    if reg_max is not None:
        assert float(ours.max()) == pytest.approx(reg_max - 0.01)
        assert float(ours.min()) == 0.0


def test_xywh_xyxy_roundtrip_and_values():
    xywh = np.array([[5.0, 6.0, 2.0, 4.0]], np.float32)
    xyxy = jaxyolo.xywh2xyxy(xywh)
    np.testing.assert_array_equal(xyxy, [[4.0, 4.0, 6.0, 8.0]])
    np.testing.assert_array_equal(jaxyolo.xyxy2xywh(xyxy), xywh)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_are_computed_in_float32(rng, dtype):
    a, b = _rand_xyxy(rng, 16), _rand_xyxy(rng, 16)
    a_lo, b_lo = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    out = jaxyolo.bbox_iou(a_lo, b_lo, xywh=False, kind="ciou")
    assert out.dtype == jnp.float32
    # Same as float32 on the rounded inputs: nothing is computed in low precision.
    ref = jaxyolo.bbox_iou(np.asarray(a_lo, np.float32), np.asarray(b_lo, np.float32), xywh=False, kind="ciou")
    np.testing.assert_array_equal(out, ref)


def test_jit_matches_eager(rng):
    a, b = _rand_xyxy(rng, 32), _rand_xyxy(rng, 32)
    for kind, conv in itertools.product(KINDS, B.CONVENTIONS):
        f = lambda x, y: jaxyolo.bbox_iou(x, y, xywh=False, kind=kind, convention=conv)  # noqa: E731
        np.testing.assert_allclose(jax.jit(f)(a, b), f(a, b), rtol=1e-6, atol=1e-7)
