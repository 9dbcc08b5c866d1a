"""NMS against the project's numpy reference, a brute-force greedy NMS written here from the
definition, and ultralytics' ``non_max_suppression``; COCO mAP through pycocotools on known cases."""

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


def _greedy_nms(boxes, scores, *, conf_thres, iou_thres, max_det, multi_label=False):
    """Greedy NMS from the definition, for one image (float64, no eps, no class offsets).

    Single-label: each box votes for its best class (first maximum).  Multi-label:
    every (box, class) pair is a candidate.  Candidates have a score ``> conf_thres``.
    Visit them by descending score, ties by lower (box, class); keep one unless a
    kept candidate of its class overlaps it with IoU ``> iou_thres``; return the
    first ``max_det`` kept as ``(index, score, class)``.
    """
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    if multi_label:
        cand = [(a, c, scores[a, c]) for a in range(len(boxes)) for c in range(scores.shape[1])]
    else:
        cand = [(a, scores[a].argmax(), scores[a].max()) for a in range(len(boxes))]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def iou(i, j):
        w = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
        h = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
        return w * h / (area[i] + area[j] - w * h)

    kept = []
    for a, c, s in sorted((x for x in cand if x[2] > conf_thres), key=lambda x: (-x[2], x[0], x[1])):
        if all(kc != c or iou(ka, a) <= iou_thres for ka, kc, _ in kept):
            kept.append((a, c, s))
    return [(a, s, c) for a, c, s in kept[:max_det]]


def _assert_nms_equals(boxes, scores, ref, *, max_det, **kw):
    """``batched_nms`` on one image equals ``ref`` (list of (index, score, class)), order included."""
    ob, osc, oc, ov = (np.asarray(x)[0] for x in batched_nms(jnp.asarray(boxes[None]), jnp.asarray(scores[None]),
                                                             max_det=max_det, **kw))
    n = len(ref)
    assert ov[:n].all() and not ov[n:].any(), (int(ov.sum()), n)
    idx = [r[0] for r in ref]
    np.testing.assert_array_equal(ob[:n], boxes[idx].reshape(n, 4))
    np.testing.assert_array_equal(osc[:n], np.asarray([r[1] for r in ref], np.float32))
    np.testing.assert_array_equal(oc[:n], [r[2] for r in ref])


@pytest.mark.parametrize("max_det", [3, 50])
def test_nms_ties_follow_lower_index(rng, max_det):
    """Equal scores everywhere: duplicated boxes, overlapping equal-score chains, equal scores
    across classes; the lower index wins each tie, also at the max_det cut."""
    base = rng.uniform(0, 100, (12, 2))
    boxes = np.concatenate([base, base + rng.uniform(10, 30, (12, 2))], 1)
    boxes = np.concatenate([boxes, boxes, boxes + [3, 0, 3, 0]]).astype(np.float32)  # exact duplicates, shifted copies
    scores = np.zeros((36, 3), np.float32)
    level = rng.choice(np.float32([0.3, 0.6, 0.9]), 36)  # only three distinct scores
    scores[np.arange(36), rng.integers(0, 3, 36)] = level
    ref = _greedy_nms(boxes, scores, conf_thres=0.1, iou_thres=0.5, max_det=max_det)
    assert len(ref) >= 3 and len({r[1] for r in ref}) < len(ref)  # ties among the kept
    _assert_nms_equals(boxes, scores, ref, conf_thres=0.1, iou_thres=0.5, max_det=max_det)


@pytest.mark.parametrize("conf,iou,max_det", [(0.05, 0.45, 300), (0.2, 0.6, 20), (0.01, 0.3, 5)])
def test_nms_matches_definition_class_aware_large_coords(rng, conf, iou, max_det):
    """Boxes up to 4000 px in 6 classes: the class offsets (class * max_wh) keep classes
    apart without changing any decision; max_det cuts the kept list."""
    xy = rng.uniform(0, 3500, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 500, (300, 2))], 1).astype(np.float32)
    boxes[150:] = boxes[:150]  # the same boxes again, mostly in other classes
    scores = (rng.uniform(0, 1, (300, 6)) ** 3).astype(np.float32)
    ref = _greedy_nms(boxes, scores, conf_thres=conf, iou_thres=iou, max_det=max_det)
    cls = [r[2] for r in ref]
    assert len(set(cls)) > 1
    _assert_nms_equals(boxes, scores, ref, conf_thres=conf, iou_thres=iou, max_det=max_det)


@pytest.mark.parametrize("conf,iou,max_det", [(0.001, 0.7, 100), (0.25, 0.45, 300), (0.1, 0.5, 7)])
def test_nms_matches_ultralytics(oracles, rng, conf, iou, max_det):
    """Against ultralytics 8.4.190 ``non_max_suppression`` (its pure-torch NMS), on scores
    without ties (torch's sort is not stable): same detections, same order, max_det cut."""
    boxes, scores = _random_case(rng, 3, 250, 4)
    ref = oracles.ultralytics_nms(boxes, scores, conf_thres=conf, iou_thres=iou, max_det=max_det)
    ob, osc, oc, ov = (np.asarray(x) for x in batched_nms(jnp.asarray(boxes), jnp.asarray(scores), conf_thres=conf,
                                                           iou_thres=iou, max_det=max_det))
    assert any(len(r) == max_det for r in ref) or max_det == 300
    for i in range(3):
        n = len(ref[i])
        assert int(ov[i].sum()) == n and ov[i, :n].all()
        np.testing.assert_allclose(ob[i, :n], ref[i][:, :4], rtol=1e-6, atol=1e-4)  # upstream round-trips cxcywh
        np.testing.assert_array_equal(osc[i, :n], ref[i][:, 4])
        np.testing.assert_array_equal(oc[i, :n], ref[i][:, 5].astype(int))


@pytest.mark.parametrize("conf,iou,max_det", [(0.001, 0.7, 300), (0.05, 0.6, 40), (0.3, 0.45, 5)])
def test_multi_label_nms_matches_ultralytics(oracles, rng, conf, iou, max_det):
    """``multi_label=True`` against ultralytics 8.4.190 ``non_max_suppression(multi_label=True)``
    (what ``DetectionValidator`` runs) on scores without ties: the same (box, class) detections,
    same order; boxes kept for several classes appear once per class."""
    boxes, scores = _random_case(rng, 3, 200, 4)
    assert len(np.unique(scores)) == scores.size  # no ties (torch's sort is not stable)
    ref = oracles.ultralytics_nms(boxes, scores, conf_thres=conf, iou_thres=iou, max_det=max_det, multi_label=True)
    ob, osc, oc, ov, cnt = (np.asarray(x) for x in batched_nms(jnp.asarray(boxes), jnp.asarray(scores), conf_thres=conf,
                                                                iou_thres=iou, max_det=max_det, multi_label=True,
                                                                pre_nms_topk=800, with_count=True))
    np.testing.assert_array_equal(cnt, (scores > conf).sum((1, 2)))
    multi = 0
    for i in range(3):
        n = len(ref[i])
        assert n > 0 and int(ov[i].sum()) == n and ov[i, :n].all()
        np.testing.assert_allclose(ob[i, :n], ref[i][:, :4], rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(osc[i, :n], ref[i][:, 4])
        np.testing.assert_array_equal(oc[i, :n], ref[i][:, 5].astype(int))
        multi += n - len(np.unique(ob[i, :n].round(2), axis=0))
    assert multi > 0 or conf > 0.1  # at low thresholds some boxes are kept for two classes


@pytest.mark.parametrize("max_det", [7, 100])
def test_multi_label_nms_matches_definition(rng, max_det):
    """Multi-label NMS equals the definition, score ties included (lower box, then lower class,
    first), and a box kept for one class does not suppress it for another."""
    boxes, scores = _random_case(rng, 1, 60, 3)
    scores = (np.round(scores[0] * 8) / 8).astype(np.float32)  # few distinct values: many ties
    boxes = boxes[0]
    full = _greedy_nms(boxes, scores, conf_thres=0.1, iou_thres=0.5, max_det=1000, multi_label=True)
    assert len({r[0] for r in full}) < len(full) and len({r[1] for r in full}) < len(full)  # multi-class boxes, ties
    ref = full[:max_det]
    _assert_nms_equals(boxes, scores, ref, conf_thres=0.1, iou_thres=0.5, max_det=max_det, multi_label=True)


def test_nms_runs_on_the_prefix_that_holds_every_candidate(rng):
    """The suppression runs on the shortest compiled prefix (128, 512, ..., K) of the
    score-sorted candidates that holds every candidate above ``conf_thres`` in the batch:
    each prefix, picked by the batch's largest count, gives the detections of the whole
    K and of the definition."""
    import functools

    import jax

    from jaxyolo.evaluate import nms

    conf, iou, max_det = 0.3, 0.5, 300
    assert nms._prefix_sizes(1200) == (128, 512, 1200) and nms._prefix_sizes(128) == (128,) and nms._prefix_sizes(100) == (100,)
    boxes, _ = _random_case(rng, 4, 300, 4)  # multi-label: K = 1200 pairs
    scores = rng.uniform(0, conf, (4, 300, 4)).astype(np.float32)
    for i, n in enumerate((0, 100, 400, 1100)):  # candidates above conf per image: one per prefix, and none
        flat = scores[i].reshape(-1)
        flat[rng.choice(flat.size, n, replace=False)] = rng.uniform(conf + 1e-3, 1, n)
    for rows in ([0, 1], [1, 2], [0, 3], [0, 1, 2, 3]):  # the batch's largest count: 100, 400, 1100, 1100
        b, s = jnp.asarray(boxes[rows]), jnp.asarray(scores[rows])
        out = [np.asarray(x) for x in batched_nms(b, s, conf_thres=conf, iou_thres=iou, max_det=max_det, multi_label=True,
                                                  pre_nms_topk=3000, with_count=True)]
        np.testing.assert_array_equal(out[4], (scores[rows] > conf).sum((1, 2)))
        cands = jax.vmap(functools.partial(nms._nms_candidates, conf_thres=conf, k=1200, max_wh=7680.0, multi_label=True))(b, s)
        full = jax.vmap(functools.partial(nms._nms_select, conf_thres=conf, iou_thres=iou, max_det=max_det))(*cands[:4])
        for o, f in zip(out, full):
            np.testing.assert_array_equal(o, np.asarray(f))
        for j, i in enumerate(rows):
            ref = _greedy_nms(boxes[i], scores[i], conf_thres=conf, iou_thres=iou, max_det=max_det, multi_label=True)
            assert int(out[3][j].sum()) == len(ref) and (len(ref) > 0) == (i > 0)
            np.testing.assert_array_equal(out[1][j, :len(ref)], np.float32([r[1] for r in ref]))


def test_multi_label_nms_drops_beyond_topk_and_counts():
    """With more candidates than ``pre_nms_topk`` the lowest-scoring go first, and the count says so."""
    boxes = np.tile(np.float32([[0, 0, 10, 10]]), (5, 1)) + np.arange(5, dtype=np.float32)[:, None] * 20
    scores = np.float32([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4], [0.3, 0.2], [0.15, 0.12]])
    b, s, c, v, n = (np.asarray(x)[0] for x in batched_nms(jnp.asarray(boxes[None]), jnp.asarray(scores[None]), conf_thres=0.1,
                                                          iou_thres=0.5, max_det=10, multi_label=True, pre_nms_topk=4, with_count=True))
    assert n == 10 and v.sum() == 4
    np.testing.assert_array_equal(s[:4], np.float32([0.9, 0.8, 0.7, 0.6]))
    np.testing.assert_array_equal(c[:4], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="pre_nms_topk"):
        batched_nms(jnp.asarray(boxes[None]), jnp.asarray(scores[None]), pre_nms_topk=0)


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
