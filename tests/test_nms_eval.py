"""NMS against a numpy reference; COCO mAP through pycocotools on known cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo.evaluate import batched_nms, coco_map, nms_reference


def _random_case(rng, b, a, nc):
    xy = rng.uniform(0, 120, (b, a, 2))
    wh = rng.uniform(4, 50, (b, a, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    scores = (rng.uniform(0, 1, (b, a, nc)) ** 3).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("conf,iou,max_det", [(0.001, 0.7, 100), (0.2, 0.5, 30), (0.5, 0.3, 300), (0.9, 0.6, 10)])
def test_nms_matches_reference(rng, conf, iou, max_det):
    boxes, scores = _random_case(rng, 3, 250, 4)
    ob, osc, oc, ov = (np.asarray(x) for x in batched_nms(jnp.asarray(boxes), jnp.asarray(scores), conf_thres=conf, iou_thres=iou, max_det=max_det))
    assert ob.shape == (3, max_det, 4) and osc.shape == (3, max_det) and oc.shape == (3, max_det) and ov.shape == (3, max_det)
    for i in range(3):
        ref = nms_reference(boxes[i], scores[i], conf_thres=conf, iou_thres=iou, max_det=max_det)
        n = int(ov[i].sum())
        assert n == len(ref)
        assert np.all(ov[i, :n]) and not np.any(ov[i, n:])  # valid first, then padding
        np.testing.assert_allclose(osc[i, :n], [r[1] for r in ref], rtol=1e-6)
        np.testing.assert_array_equal(oc[i, :n], [r[2] for r in ref])
        np.testing.assert_allclose(ob[i, :n], np.stack([r[0] for r in ref]) if ref else np.zeros((0, 4)), rtol=1e-6)
        assert np.all(osc[i, n:] == 0)


def test_nms_class_aware_and_thresholds():
    boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [50, 50, 60, 60]]], np.float32)
    scores = np.zeros((1, 4, 2), np.float32)
    scores[0, 0, 0] = 0.9  # kept
    scores[0, 1, 0] = 0.8  # same class, IoU 0.82 with box 0: suppressed
    scores[0, 2, 1] = 0.7  # overlaps box 0 but another class: kept
    scores[0, 3, 0] = 0.05  # below conf_thres
    b, s, c, v = (np.asarray(x) for x in batched_nms(jnp.asarray(boxes), jnp.asarray(scores), conf_thres=0.1, iou_thres=0.5, max_det=5))
    assert v.tolist() == [[True, True, False, False, False]]
    np.testing.assert_allclose(s[0, :2], [0.9, 0.7])
    assert c[0, :2].tolist() == [0, 1]
    np.testing.assert_array_equal(b[0, 1], boxes[0, 2])


def test_nms_nothing_above_threshold():
    b, s, c, v = batched_nms(jnp.zeros((2, 10, 4)), jnp.zeros((2, 10, 3)), conf_thres=0.5, iou_thres=0.5, max_det=4)
    assert not np.any(np.asarray(v)) and np.all(np.asarray(s) == 0)


def test_nms_bad_shapes():
    with pytest.raises(ValueError, match="boxes"):
        batched_nms(jnp.zeros((10, 4)), jnp.zeros((10, 3)))
    with pytest.raises(ValueError, match="scores"):
        batched_nms(jnp.zeros((1, 10, 4)), jnp.zeros((1, 9, 3)))


def _gt():
    # two images, img_size 100: [class, cx, cy, w, h]
    return [np.array([[0, 0.3, 0.3, 0.2, 0.2], [1, 0.7, 0.6, 0.3, 0.4]]), np.array([[2, 0.5, 0.5, 0.5, 0.5]])]


def _as_dets(gt, shift=0.0):
    out = []
    for lab in gt:
        b = np.stack([(lab[:, 1] - lab[:, 3] / 2) * 100 + shift, (lab[:, 2] - lab[:, 4] / 2) * 100,
                      (lab[:, 1] + lab[:, 3] / 2) * 100 + shift, (lab[:, 2] + lab[:, 4] / 2) * 100], -1)
        out.append((b, np.full(len(lab), 0.9), lab[:, 0].astype(int)))
    return out


def test_coco_map_perfect_and_empty():
    gt = _gt()
    r = coco_map(gt, _as_dets(gt), img_size=100, nc=3)
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0)
    r = coco_map(gt, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * 2, img_size=100, nc=3)
    assert r == {"map50": 0.0, "map50_95": 0.0}


def test_coco_map_iou_thresholds():
    # One 20x20 box, detection shifted by 5 px: IoU = 15*20 / (2*400 - 300) = 0.6 -> counts for
    # thresholds 0.50, 0.55, 0.60 (pycocotools uses IoU >= t): 3 of 10.
    gt = [np.array([[0, 0.3, 0.3, 0.2, 0.2]])]
    r = coco_map(gt, _as_dets(gt, shift=4.9), img_size=100, nc=1)
    assert r["map50"] == pytest.approx(1.0)
    assert r["map50_95"] == pytest.approx(0.3, abs=1e-6)
    # wrong class -> nothing matches
    r = coco_map(gt, [(np.array([[20.0, 20, 40, 40]]), np.array([0.9]), np.array([1]))], img_size=100, nc=2)
    assert r["map50"] == 0.0


def test_coco_map_false_positive_lowers_precision():
    gt = [np.array([[0, 0.3, 0.3, 0.2, 0.2]]), np.zeros((0, 5))]
    dets = _as_dets(gt[:1])
    fp = (np.array([[10.0, 10, 30, 30]]), np.array([0.95]), np.array([0]))  # higher score, empty image
    r = coco_map(gt, dets + [fp], img_size=100, nc=1)
    assert 0.4 < r["map50"] < 0.6  # precision 1/2 at recall 1
