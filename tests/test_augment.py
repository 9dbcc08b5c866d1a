"""On-device augmentations against ultralytics' transforms (called with their draws fixed) and OpenCV."""

import dataclasses
import functools
import random
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo import Targets
from jaxyolo.data.augment import (
    N_UNIFORM,
    AugmentConfig,
    AugmentParams,
    apply_augment,
    augment,
    box_candidates,
    hsv_augment,
    pad_to_mosaic,
    params_from_uniform,
    sample_params,
)
from jaxyolo.data.images import letterbox

S = 128
PLAIN = AugmentConfig(mosaic=0.0, translate=0.0, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0)


def _upstream():
    from jaxyolo.testing import oracles

    oracles.torch()
    import ultralytics.data.augment as ua
    from ultralytics.utils.instance import Instances

    return ua, Instances


@functools.cache
def _apply(config, max_boxes):
    """One compiled ``apply_augment`` per (config, max_boxes)."""
    return jax.jit(functools.partial(apply_augment, config=config, max_boxes=max_boxes))


def _params(b, *, matrix, mosaic=False, center=(S, S), scale=1.0, hsv=(0.0, 0.0, 0.0), fliplr=False, flipud=False):
    """Hand-made parameters (the random draw bypassed)."""
    return AugmentParams(
        mosaic=jnp.full((b,), mosaic),
        center=jnp.tile(jnp.asarray([center], jnp.int32), (b, 1)),
        matrix=jnp.tile(jnp.asarray(matrix, jnp.float32)[None], (b, 1, 1)),
        scale=jnp.full((b,), scale, jnp.float32),
        hsv=jnp.tile(jnp.asarray([hsv], jnp.float32), (b, 1)),
        flipud=jnp.full((b,), flipud),
        fliplr=jnp.full((b,), fliplr),
    )


def _targets(boxes, classes, mask):
    return Targets(jnp.asarray(boxes, jnp.float32), jnp.asarray(classes, jnp.int32), jnp.asarray(mask, bool))


def _xyxy(t: Targets, b: int):
    n = int(np.asarray(t.mask[b]).sum())
    c = np.asarray(t.boxes[b][:n], np.float64) * S
    return np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1), np.asarray(t.classes[b][:n])


def random_sources(rng, n, m):
    """n letterboxed frames of random sizes, each with up to m boxes painted in random colours."""
    import cv2

    frames, rects = np.zeros((n, S, S, 3), np.uint8), np.zeros((n, 4), np.int32)
    boxes, classes, mask = np.zeros((n, m, 4), np.float32), np.zeros((n, m), np.int32), np.zeros((n, m), bool)
    for i in range(n):
        h, w = rng.integers(40, 300, 2)
        img = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        frames[i], rects[i] = letterbox(img, S)
        top, left, hh, ww = rects[i]
        for j in range(rng.integers(0, m + 1)):
            bw, bh = rng.uniform(0.05, 0.6, 2)
            cx, cy = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
            boxes[i, j] = [(cx * ww + left) / S, (cy * hh + top) / S, bw * ww / S, bh * hh / S]
            classes[i, j], mask[i, j] = rng.integers(0, 5), True
            x1, y1 = int((cx - bw / 2) * ww + left), int((cy - bh / 2) * hh + top)
            x2, y2 = int((cx + bw / 2) * ww + left), int((cy + bh / 2) * hh + top)
            frames[i, y1:y2, x1:x2] = rng.integers(0, 256, 3)
    return frames, rects, boxes, classes, mask


def run_upstream(frames, rects, boxes, classes, mask, u, cfg):
    """ultralytics' v8 chain (Mosaic -> RandomPerspective -> RandomHSV -> flips)
    on the un-padded images, with every random draw taken from ``u``
    (our :data:`N_UNIFORM` columns); returns RGB image, xyxy boxes, classes."""
    ua, Instances = _upstream()
    items = []
    for k in range(frames.shape[0]):
        top, left, h, w = rects[k]
        b = boxes[k][mask[k]].astype(np.float32).copy()
        b[:, 0], b[:, 1] = (b[:, 0] * S - left) / w, (b[:, 1] * S - top) / h
        b[:, 2], b[:, 3] = b[:, 2] * S / w, b[:, 3] * S / h
        inst = Instances(b.reshape(-1, 4), np.zeros((0, 1000, 2), np.float32), None, bbox_format="xywh", normalized=True)
        img = np.ascontiguousarray(frames[k, top : top + h, left : left + w, ::-1])  # BGR
        items.append({"img": img, "resized_shape": (h, w), "ori_shape": (h, w), "im_file": f"{k}.jpg",
                      "cls": classes[k][mask[k]].reshape(-1, 1).astype(np.float32), "instances": inst})
    dataset = type("Data", (), {"cache": "ram", "buffer": [], "__len__": lambda self: len(items),
                                "get_image_and_label": lambda self, i: items[i]})()
    mosaic = u[0] < cfg.mosaic
    uniform = iter([u[0], u[1], u[2], *u[3:11]] if mosaic else [u[0], *u[3:11]])
    others, flips = iter([1, 2, 3]), iter([u[14], u[15]])
    with mock.patch.object(random, "uniform", lambda a, b: a + (b - a) * float(next(uniform))), \
         mock.patch.object(random, "randint", lambda a, b: next(others)), \
         mock.patch.object(random, "random", lambda: float(next(flips))), \
         mock.patch.object(np.random, "uniform", lambda a, b, n: np.asarray(u[11:14], np.float64) * 2 - 1):
        labels = ua.Mosaic(dataset, imgsz=S, p=cfg.mosaic)(items[0])
        labels = ua.RandomPerspective(degrees=cfg.degrees, translate=cfg.translate, scale=cfg.scale, shear=cfg.shear,
                                      perspective=cfg.perspective, size=(S, S))(labels)
        labels = ua.RandomHSV(cfg.hsv_h, cfg.hsv_s, cfg.hsv_v)(labels)
        labels = ua.RandomFlip(p=cfg.flipud, direction="vertical")(labels)
        labels = ua.RandomFlip(p=cfg.fliplr, direction="horizontal")(labels)
    inst = labels["instances"]
    inst.convert_bbox("xyxy")
    return labels["img"][..., ::-1], inst.bboxes, labels["cls"].ravel()


@pytest.mark.parametrize(
    "cfg, k",
    [
        (AugmentConfig(), 4),  # the defaults: mosaic, translate 0.1, scale 0.5, HSV, flip LR
        (AugmentConfig(mosaic=0.5, degrees=15.0, shear=4.0, flipud=0.5), 4),  # mixed mosaic / single
        (AugmentConfig(mosaic=0.0), 1),  # close_mosaic: the letterboxed single image
        (AugmentConfig(degrees=5.0, perspective=5e-4), 4),
    ],
)
def test_matches_ultralytics_v8_transforms(rng, cfg, k):
    b, m = 6, 6
    frames, rects, boxes, classes, mask = random_sources(rng, b * k, m)
    frames, rects = frames.reshape(b, k, S, S, 3), rects.reshape(b, k, 4)
    boxes, classes, mask = boxes.reshape(b, k, m, 4), classes.reshape(b, k, m), mask.reshape(b, k, m)
    u = rng.random((b, N_UNIFORM)).astype(np.float32)
    params = params_from_uniform(u, jnp.asarray(rects), config=cfg, size=S, mosaic_ok=k == 4)
    out, t, dropped = _apply(cfg, 4 * m)(params, jnp.asarray(frames), jnp.asarray(rects), _targets(boxes, classes, mask))
    out = np.asarray(out)
    assert not np.asarray(dropped).any()
    for i in range(b):
        ref_img, ref_boxes, ref_cls = run_upstream(frames[i], rects[i], boxes[i], classes[i], mask[i], u[i], cfg)
        diff = np.abs(out[i].astype(int) - ref_img)
        # OpenCV inverts the warp matrix in float64, we in float32: a few edge pixels differ by
        # one level before HSV (which can stretch that to a few levels).
        assert (diff > 0).mean() < 1e-3 and diff.max() <= 8, (i, diff.max(), (diff > 0).mean())
        got, got_cls = _xyxy(t, i)
        np.testing.assert_allclose(got, ref_boxes.reshape(-1, 4), atol=1e-3)
        np.testing.assert_array_equal(got_cls, ref_cls)


def test_box_candidates_matches_upstream(rng):
    ua, _ = _upstream()
    n = 400
    b1 = np.sort(rng.uniform(0, 60, (n, 2, 2)), axis=1).transpose(0, 2, 1).reshape(n, 4)[:, [0, 2, 1, 3]]
    b2 = b1 * rng.uniform(0.2, 1.2, (n, 1)) + rng.uniform(-3, 3, (n, 4))
    b2[:, 2:] = np.maximum(b2[:, 2:], b2[:, :2])
    b2[:40, 2] = b2[:40, 0] + rng.uniform(0, 3, 40)  # thin boxes around wh_thr
    b2[40:60, 3] = b2[40:60, 1] + 0.01  # extreme aspect ratios
    b1, b2 = b1.astype(np.float32), b2.astype(np.float32)
    ref = ua.RandomPerspective.box_candidates(box1=b1.T, box2=b2.T)
    got = np.asarray(box_candidates(jnp.asarray(b1), jnp.asarray(b2)))
    np.testing.assert_array_equal(got, ref)
    assert 0.1 < ref.mean() < 0.9  # both outcomes exercised


def test_hsv_matches_upstream_random_hsv(rng):
    """RandomHSV itself (its np.random.uniform fixed) on the same image, exactly."""
    ua, _ = _upstream()
    img = rng.integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    img[:, :8] = 114  # grey padding changes too
    u = rng.uniform(-1, 1, (3, 3))
    gains = np.asarray([0.015, 0.7, 0.4])
    got = np.asarray(jax.jit(hsv_augment)(jnp.asarray(img), jnp.asarray(u * gains, jnp.float32)))
    for i in range(3):
        labels = {"img": np.ascontiguousarray(img[i, ..., ::-1])}
        with mock.patch.object(np.random, "uniform", lambda a, b, n: u[i]):
            ua.RandomHSV(*gains)(labels)
        np.testing.assert_array_equal(got[i], labels["img"][..., ::-1])


def test_hsv_conversions_equal_opencv_for_every_colour():
    """Zero gains leave the lookup tables the identity, so the result is
    OpenCV's uint8 RGB->HSV->RGB round trip: checked on all 2^24 colours."""
    import cv2

    v = np.arange(256, dtype=np.uint8)
    img = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(64, 1024, 256, 3)
    got = np.asarray(jax.jit(hsv_augment)(jnp.asarray(img), jnp.zeros((64, 3), jnp.float32)))
    for i in range(0, 64, 8):
        ref = cv2.cvtColor(cv2.cvtColor(img[i], cv2.COLOR_RGB2HSV), cv2.COLOR_HSV2RGB)
        np.testing.assert_array_equal(got[i], ref)
    assert (got != img).mean() > 0.1  # the round trip is lossy: the check has teeth


def test_affine_matches_cv2_warp(rng):
    """A fixed matrix (rotation, shear, scale, translation) on letterboxed
    frames: pixels as cv2.warpAffine(INTER_LINEAR, borderValue=114)."""
    import cv2

    frames, rects, *_ = random_sources(rng, 2, 1)
    a = np.deg2rad(17.0)
    M = np.asarray([[1.1 * np.cos(a), 1.1 * np.sin(a) + 0.1, -20.3], [-1.1 * np.sin(a), 1.1 * np.cos(a), 31.7], [0, 0, 1]], np.float32)
    empty = _targets(np.zeros((2, 1, 6, 4)), np.zeros((2, 1, 6)), np.zeros((2, 1, 6)))
    out, _, _ = _apply(PLAIN, 6)(_params(2, matrix=M), jnp.asarray(frames[:, None]), jnp.asarray(rects[:, None]), empty)
    for i in range(2):
        ref = cv2.warpAffine(frames[i], M[:2].astype(np.float64), (S, S), borderValue=(114, 114, 114))
        diff = np.abs(np.asarray(out[i]).astype(int) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
        assert (diff == 0).mean() > 0.999


def test_mosaic_of_known_images():
    """Four frames, each a solid colour with a solid box in another colour;
    image 2 letterboxed (content 128 x 64).  With the centre at (160, 100) and
    the canvas shown 1:1 from (64, 64) the boxes land at known places, the
    pixels there have the box colours, and the letterbox padding of image 2
    never enters the mosaic."""
    frames = np.zeros((1, 4, S, S, 3), np.uint8)
    rects = np.asarray([[[0, 0, S, S], [0, 0, S, S], [0, 32, S, 64], [0, 0, S, S]]], np.int32)
    bg = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    fg = [(255, 255, 255), (10, 10, 10), (255, 0, 255), (0, 255, 255)]
    for k in range(4):
        frames[0, k] = 114
        top, left, h, w = rects[0, k]
        frames[0, k, top : top + h, left : left + w] = bg[k]
    # boxes in frame pixels (x1, y1, x2, y2)
    box = np.asarray([[90, 100, 120, 124], [8, 90, 40, 120], [36, 4, 90, 30], [10, 10, 50, 40]], np.float64)
    for k in range(4):
        x1, y1, x2, y2 = box[k].astype(int)
        frames[0, k, y1:y2, x1:x2] = fg[k]
    cxcywh = np.concatenate([(box[:, :2] + box[:, 2:]) / 2, box[:, 2:] - box[:, :2]], 1) / S
    t = _targets(cxcywh[None, :, None], np.arange(4)[None, :, None], np.ones((1, 4, 1)))
    xc, yc, ox, oy = 160, 100, 64, 64
    M = np.asarray([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]], np.float32)
    out, got, dropped = _apply(PLAIN, 6)(_params(1, matrix=M, mosaic=True, center=(xc, yc)), jnp.asarray(frames), jnp.asarray(rects), t)
    out = np.asarray(out[0])
    # Mosaic._mosaic4 offsets: tile0 (xc - w, yc - h), tile1 (xc, yc - h), tile2 (xc - w, yc), tile3 (xc, yc);
    # frame -> content subtracts the content's left/top.
    pads = np.asarray([[xc - S, yc - S], [xc, yc - S], [xc - 64 - 32, yc], [xc, yc]], np.float64)
    expect = np.clip(box + np.tile(pads, 2) - [ox, oy, ox, oy], 0, S)
    xyxy, cls = _xyxy(got, 0)
    np.testing.assert_array_equal(cls, [0, 1, 2, 3])
    np.testing.assert_allclose(xyxy, expect, atol=1e-4)
    assert int(dropped[0]) == 0 and int(got.mask[0].sum()) == 4
    for k in range(4):  # every box's pixels carry its colour
        x1, y1, x2, y2 = expect[k].astype(int)
        assert (out[y1:y2, x1:x2] == fg[k]).all(), k
    # each quadrant around the centre shows its tile's background; image 2's
    # content ends 64 px left of the centre, beyond it the mosaic fill (114)
    assert (out[yc - oy - 2, xc - ox - 2] == bg[0]).all() and (out[yc - oy - 2, xc - ox + 2] == bg[1]).all()
    assert (out[yc - oy + 40, xc - ox - 2] == bg[2]).all() and (out[yc - oy + 2, xc - ox + 4] == bg[3]).all()
    assert (out[yc - oy + 40, : xc - ox - 64] == 114).all() and (out[yc - oy + 40, xc - ox - 64] == bg[2]).all()


def test_flips():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 1, S, S, 3), dtype=np.uint8)
    rects = np.tile(np.asarray([[[0, 0, S, S]]], np.int32), (2, 1, 1))
    t = _targets([[[[0.25, 0.3, 0.2, 0.1]]], [[[0.6, 0.7, 0.1, 0.3]]]], [[[1]], [[2]]], [[[True]], [[True]]])
    eye = np.eye(3, dtype=np.float32)
    cfg = dataclasses.replace(PLAIN, fliplr=0.5, flipud=0.5)
    for lr, ud in ((True, False), (False, True), (True, True)):
        out, got, _ = _apply(cfg, 2)(_params(2, matrix=eye, fliplr=lr, flipud=ud), jnp.asarray(frames), jnp.asarray(rects), t)
        ref = frames[:, 0][:, :: -1 if ud else 1, :: -1 if lr else 1]
        np.testing.assert_array_equal(np.asarray(out), ref)
        want = np.asarray(t.boxes)[:, 0, 0].copy()
        want[:, 0] = 1 - want[:, 0] if lr else want[:, 0]
        want[:, 1] = 1 - want[:, 1] if ud else want[:, 1]
        np.testing.assert_allclose(np.asarray(got.boxes)[:, 0], want, atol=1e-6)


def test_clipping_candidates_compaction_and_dropped():
    """Boxes cut by the output edge are clipped, slivers dropped by
    box_candidates, survivors compacted to the front in order, the overflow
    beyond max_boxes counted."""
    frames = np.full((1, 1, S, S, 3), 100, np.uint8)
    rects = np.asarray([[[0, 0, S, S]]], np.int32)
    # x1 y1 x2 y2 in pixels; identity warp shifted right by 40 px
    px = np.asarray([[10, 10, 30, 30], [100, 10, 120, 40], [-0, 50, 1, 90], [90, 60, 126, 70], [20, 80, 40, 100], [5, 100, 25, 120]], np.float64)
    mask = np.asarray([True, True, True, True, False, True])
    c = np.concatenate([(px[:, :2] + px[:, 2:]) / 2, px[:, 2:] - px[:, :2]], 1) / S
    t = _targets(c[None, None], np.arange(6)[None, None], mask[None, None])
    M = np.asarray([[1, 0, 40], [0, 1, 0], [0, 0, 1]], np.float32)
    _, got, dropped = _apply(PLAIN, 2)(_params(1, matrix=M), jnp.asarray(frames), jnp.asarray(rects), t)
    # box 1 -> x 140..160: off the image (0 width); box 2: 1 px wide; box 3 -> 130..166 clipped to 128: 0 width;
    # box 4 masked; survivors 0 and 5, then nothing: with max_boxes=2 none dropped.
    xyxy, cls = _xyxy(got, 0)
    np.testing.assert_array_equal(cls, [0, 5])
    np.testing.assert_allclose(xyxy, [[50, 10, 70, 30], [45, 100, 65, 120]], atol=1e-4)
    assert int(dropped[0]) == 0
    M[0, 2] = 0
    _, got, dropped = _apply(PLAIN, 2)(_params(1, matrix=M), jnp.asarray(frames), jnp.asarray(rects), t)
    # unshifted: boxes 0, 1, 3, 5 survive (box 2 is 1 px wide): two kept, two counted as dropped
    assert np.asarray(got.classes[0]).tolist() == [0, 1] and int(dropped[0]) == 2
    _, got, _ = _apply(PLAIN, 9)(_params(1, matrix=M), jnp.asarray(frames), jnp.asarray(rects), t)
    assert np.asarray(got.mask[0]).tolist() == [True] * 4 + [False] * 5 and not np.asarray(got.boxes[0, 4:]).any()


def _batch(rng, b=4, m=5):
    frames, rects, boxes, classes, mask = random_sources(rng, 4 * b, m)
    return (jnp.asarray(frames.reshape(b, 4, S, S, 3)), jnp.asarray(rects.reshape(b, 4, 4)),
            _targets(boxes.reshape(b, 4, m, 4), classes.reshape(b, 4, m), mask.reshape(b, 4, m)))


def test_deterministic_from_the_key_jit_equals_eager(rng):
    images, rects, t = _batch(rng, b=2)
    fn = functools.partial(augment, config=AugmentConfig(degrees=10.0), max_boxes=20)
    a = jax.jit(fn)(jax.random.PRNGKey(7), images, rects, t)
    b = jax.jit(fn)(jax.random.PRNGKey(7), images, rects, t)
    params = jax.jit(functools.partial(sample_params, config=AugmentConfig(degrees=10.0), size=S))(jax.random.PRNGKey(7), rects)
    c = apply_augment(params, images, rects, t, config=AugmentConfig(degrees=10.0), max_boxes=20)  # eager
    d = jax.jit(fn)(jax.random.PRNGKey(8), images, rects, t)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # Eager and jit round the matrix inversion differently (~1e-6): a few edge
    # pixels may move by a level or two.
    diff = np.abs(np.asarray(a[0]).astype(int) - np.asarray(c[0]))
    assert diff.max() <= 3 and (diff > 0).mean() < 1e-3
    np.testing.assert_array_equal(a[1].mask, c[1].mask)
    np.testing.assert_allclose(a[1].boxes, c[1].boxes, atol=1e-4)
    assert not np.array_equal(a[0], d[0])
    p = params_from_uniform(jax.random.uniform(jax.random.PRNGKey(7), (4, N_UNIFORM)), jnp.tile(rects[:1], (4, 1, 1)),
                            config=AugmentConfig(), size=S)
    assert len(set(np.asarray(p.center)[:, 0].tolist())) > 1  # independent draws per image


def test_padded_batch_augments_as_without_mosaic(rng):
    """A K = 1 batch padded to K = 4 (``pad_to_mosaic``: frames 1-3 empty) through the
    mosaic config (``mosaic=1``) gives the K = 1 batch's augmentation without mosaic, bit
    for bit: the trainer's closing epochs run its mosaic epochs' compiled step this way.
    A mixed batch mosaics exactly the images that have partners."""
    images, rects, t = _batch(rng, b=4)
    one = {"image": images[:, :1], "rects": rects[:, :1], "boxes": t.boxes[:, :1], "classes": t.classes[:, :1],
           "mask": t.mask[:, :1], "other": jnp.arange(4)}
    padded = jax.jit(pad_to_mosaic)(one)
    assert padded["image"].shape == (4, 4, S, S, 3) and padded["mask"].shape == (4, 4, t.mask.shape[-1])
    assert not np.asarray(padded["mask"][:, 1:]).any() and not np.asarray(padded["rects"][:, 1:]).any()
    np.testing.assert_array_equal(padded["other"], one["other"])
    cfg = AugmentConfig(degrees=10.0, shear=2.0, fliplr=0.5, flipud=0.5)
    without = jax.jit(functools.partial(augment, config=dataclasses.replace(cfg, mosaic=0.0), max_boxes=20))
    with_mosaic = jax.jit(functools.partial(augment, config=cfg, max_boxes=20))
    for seed in range(3):
        a = without(jax.random.PRNGKey(seed), one["image"], one["rects"], Targets(one["boxes"], one["classes"], one["mask"]))
        b = with_mosaic(jax.random.PRNGKey(seed), padded["image"], padded["rects"],
                        Targets(padded["boxes"], padded["classes"], padded["mask"]))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    # images 0 and 2 keep their partners, 1 and 3 lose them: only 0 and 2 are mosaicked
    mixed = rects.at[1::2, 1:].set(0)
    p = sample_params(jax.random.PRNGKey(0), mixed, config=cfg, size=S)
    np.testing.assert_array_equal(p.mosaic, [True, False, True, False])
    with pytest.raises(ValueError, match=r"pad_to_mosaic takes a K = 1 batch"):
        pad_to_mosaic(padded)


def test_no_retrace_across_box_counts(rng):
    traces = []

    @jax.jit
    def step(key, images, rects, t):
        traces.append(1)
        return augment(key, images, rects, t, max_boxes=20)

    images, rects, t = _batch(rng, b=2)
    for n in (0, 1, 3, 5):
        mask = np.zeros(t.mask.shape, bool)
        mask[..., :n] = True
        out = step(jax.random.PRNGKey(n), images, rects, Targets(t.boxes, t.classes, jnp.asarray(mask)))
        assert int(np.asarray(out[1].mask).sum()) <= 2 * 4 * n
    assert len(traces) == 1


def test_bad_inputs():
    images = jnp.zeros((2, 1, S, S, 3), jnp.uint8)
    rects = jnp.zeros((2, 1, 4), jnp.int32)
    t = _targets(np.zeros((2, 1, 3, 4)), np.zeros((2, 1, 3)), np.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match=r"mosaic = 1.0 needs K = 4 source images per output, got K = 1"):
        augment(jax.random.PRNGKey(0), images, rects, t, max_boxes=4)
    with pytest.raises(TypeError, match="images must be uint8"):
        augment(jax.random.PRNGKey(0), images.astype(jnp.float32), rects, t, config=PLAIN, max_boxes=4)
    with pytest.raises(ValueError, match=r"rects must be \(B, K, 4\)"):
        augment(jax.random.PRNGKey(0), images, rects[:, :, :2], t, config=PLAIN, max_boxes=4)
    with pytest.raises(ValueError, match=r"targets.boxes must be \(B, K, M, 4\)"):
        augment(jax.random.PRNGKey(0), images, rects, _targets(np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros((2, 3))), config=PLAIN, max_boxes=4)
    with pytest.raises(ValueError, match="AugmentConfig.fliplr is a probability"):
        AugmentConfig(fliplr=1.5)
    with pytest.raises(ValueError, match="AugmentConfig.degrees must be a finite number >= 0"):
        AugmentConfig(degrees=-1.0)
