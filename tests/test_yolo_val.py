"""The ultralytics-compatible metric (``jaxyolo.evaluate.yolo_val``) against ultralytics 8.4.190's
own ``DetectionValidator`` on the same detections; and known cases worked out by hand."""

import numpy as np
import pytest

from jaxyolo.evaluate.yolo_val import IOU_THRESHOLDS, format_val_table, match_predictions, yolo_val_metrics

S = 128


def _synthetic(rng, n_images=40, nc=4):
    """Crowded, multi-class and empty images; detections near the labels (jittered, some with
    the wrong class, some duplicates) plus clutter, several kept for two classes as multi-label
    NMS does; scores distinct within the set except for a few deliberate ties."""
    labels, dets = [], []
    for i in range(n_images):
        kind = i % 5
        n = 0 if kind == 0 else (rng.integers(15, 30) if kind == 1 else rng.integers(1, 6))
        cxy = rng.uniform(0.1, 0.9, (n, 2))
        wh = rng.uniform(0.03, 0.3, (n, 2)) * (0.3 if kind == 1 else 1.0)
        cls = rng.integers(0, nc - 1 if kind != 2 else nc, n)  # class nc-1 only in some images
        labels.append(np.concatenate([cls[:, None], cxy, wh], 1).astype(np.float32))
        gt = np.concatenate([cxy - wh / 2, cxy + wh / 2], 1) * S
        boxes, classes = [], []
        for j in range(n):
            for _ in range(rng.integers(0, 3)):
                boxes.append(gt[j] + rng.normal(0, 0.06, 4) * (gt[j, 2:] - gt[j, :2]).repeat(2))
                classes.append(cls[j] if rng.uniform() < 0.8 else rng.integers(0, nc))
        for _ in range(rng.integers(0, 8)):  # clutter
            xy = rng.uniform(0, S - 20, 2)
            boxes.append(np.concatenate([xy, xy + rng.uniform(4, 40, 2)]))
            classes.append(rng.integers(0, nc))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        classes = np.asarray(classes, np.int64)
        if len(boxes) > 2:  # the same box again for another class (multi-label)
            boxes = np.concatenate([boxes, boxes[:2]])
            classes = np.concatenate([classes, (classes[:2] + 1) % nc])
        scores = rng.uniform(0.001, 1.0, len(boxes)).astype(np.float32)
        if i % 7 == 3 and len(scores) > 3:
            scores[1] = scores[2]  # a tie within an image
        order = np.argsort(-scores, kind="stable")
        dets.append((boxes[order], scores[order], classes[order]))
    return labels, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_detection_validator(oracles, tmp_path, seed):
    rng = np.random.default_rng(seed)
    nc = 4
    labels, dets = _synthetic(rng, nc=nc)
    assert any(len(x) == 0 for x in labels) and max(len(x) for x in labels) >= 15
    ref = oracles.ultralytics_val_metrics(labels, dets, img_size=S, nc=nc, save_dir=tmp_path)
    got = yolo_val_metrics(labels, dets, img_size=S, nc=nc)
    p, r, m50, m = ref["mean"]
    assert 0.1 < m < m50 < 1.0 and 0 < p < 1 and 0 < r < 1  # a non-trivial case
    np.testing.assert_allclose([got["precision"], got["recall"], got["map50"], got["map50_95"]], [p, r, m50, m], rtol=0, atol=1e-6)
    assert ref["results"]["metrics/mAP50-95(B)"] == pytest.approx(got["map50_95"], abs=1e-6)
    assert [c["class"] for c in got["per_class"]] == ref["classes"]
    for c, (pp, rr, a50, a) in zip(got["per_class"], ref["class_results"]):
        np.testing.assert_allclose([c["precision"], c["recall"], c["map50"], c["map50_95"]], [pp, rr, a50, a], rtol=0, atol=1e-6)
        assert c["instances"] == ref["nt_per_class"][c["class"]] and c["images"] == ref["nt_per_image"][c["class"]]
    assert got["images"] == ref["seen"] and got["instances"] == int(ref["nt_per_class"].sum())


def test_iou_thresholds_are_torch_linspace(oracles):
    t = oracles.torch()
    np.testing.assert_array_equal(IOU_THRESHOLDS, t.linspace(0.5, 0.95, 10).numpy())


def test_match_predictions_greedy_in_score_order():
    # Two labels of class 0 (rows); detection 0 (best score) overlaps label 0 at 0.9 and label 1
    # at 0.6: it claims label 0 at every threshold <= 0.9.  There detection 1 takes label 1 (IoU
    # 0.7), a match up to 0.7; at 0.95 label 0 is still free and detection 1's IoU 0.95 with it
    # counts: each threshold has its own claims.
    iou = np.float32([[0.9, 0.95], [0.6, 0.7]])
    tp = match_predictions(np.float32([0, 0]), np.float32([0, 0]), iou)
    np.testing.assert_array_equal(tp[0], IOU_THRESHOLDS <= np.float32(0.9))
    np.testing.assert_array_equal(tp[1], (IOU_THRESHOLDS <= np.float32(0.7)) | (IOU_THRESHOLDS > np.float32(0.9)))
    # another class never matches
    assert not match_predictions(np.float32([1]), np.float32([0]), np.float32([[1.0]])).any()


def test_perfect_and_empty():
    labels = [np.float32([[0, 0.3, 0.3, 0.2, 0.2], [1, 0.7, 0.6, 0.3, 0.4]]), np.zeros((0, 5), np.float32)]
    boxes = [np.stack([(l[:, 1] - l[:, 3] / 2) * S, (l[:, 2] - l[:, 4] / 2) * S, (l[:, 1] + l[:, 3] / 2) * S, (l[:, 2] + l[:, 4] / 2) * S], 1) for l in labels]
    dets = [(boxes[0], np.float32([0.9, 0.8]), np.int64([0, 1])), (np.zeros((0, 4)), np.zeros(0), np.zeros(0))]
    r = yolo_val_metrics(labels, dets, img_size=S, nc=2)
    # Perfect detections score 0.995, as in ultralytics: at recall 1 the 101-point curve reaches the
    # sentinel precision 0, so the last trapezoid (recall 0.99 to 1) counts half.
    assert r["map50"] == pytest.approx(0.995, abs=1e-12) and r["map50_95"] == pytest.approx(0.995, abs=1e-12)
    assert r["instances"] == 2 and r["images"] == 2 and [c["images"] for c in r["per_class"]] == [1, 1]
    none = yolo_val_metrics(labels, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * 2, img_size=S, nc=2)
    assert none["map50"] == 0.0 and none["precision"] == 0.0
    table = format_val_table(r, names=["circle", "square"])
    assert table.splitlines()[1].split()[:3] == ["all", "2", "2"] and table.splitlines()[2].split()[0] == "circle"
    with pytest.raises(ValueError, match="detections"):
        yolo_val_metrics(labels, dets[:1], img_size=S, nc=2)


def test_evaluate_model_both_metrics_and_overflow_warning():
    """``evaluate_model`` scores the predict's detections both ways (here: the labels themselves,
    class 1 also given as a second label of each box, as multi-label NMS can), leaves padding
    rows out, and warns when an image had more NMS candidates than the NMS takes."""
    import jax.numpy as jnp

    from jaxyolo import parallel
    from jaxyolo.data import DetectionData
    from jaxyolo.evaluate import EVAL_PRE_NMS_TOPK, eval_max_det, evaluate_model

    labels = (np.float32([[0, 0.3, 0.3, 0.2, 0.2], [1, 0.7, 0.6, 0.3, 0.4]]), np.zeros((0, 5), np.float32),
              np.float32([[2, 0.5, 0.5, 0.5, 0.5]]))
    data = DetectionData(np.zeros((3, S, S, 3), np.uint8), labels, ("a", "b", "c"))
    assert eval_max_det(300, data) == 300 and eval_max_det(1, data) == 2
    d = 4
    table = np.zeros((3, d, 4), np.float32)
    scores, classes, valid = np.zeros((3, d), np.float32), np.zeros((3, d), np.int32), np.zeros((3, d), bool)
    for i, lab in enumerate(labels):
        for j, (c, cx, cy, w, h) in enumerate(lab):
            table[i, j] = np.float32([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * S
            scores[i, j], classes[i, j], valid[i, j] = 0.9 - 0.1 * j, c, True
    table[0, 2], scores[0, 2], classes[0, 2], valid[0, 2] = table[0, 0], 0.5, 1, True  # box 0 again, as class 1
    counts = np.int32([5, 0, EVAL_PRE_NMS_TOPK + 7])
    batch = 2
    mesh = parallel.make_mesh(1)

    def predict(params, stats, images):  # the detections of the batch's images, by call count
        rows = np.arange(predict.calls * batch, (predict.calls + 1) * batch) % 3  # the last batch padded
        predict.calls += 1
        return tuple(jnp.asarray(x[rows]) for x in (table, scores, classes, valid, counts))

    predict.calls = 0
    warned = []
    res = evaluate_model(predict, None, None, data, batch_size=batch, max_boxes=4, sharding=parallel.batch_sharding(mesh), warn=warned.append)
    assert predict.calls == 2 and res["nms_overflow"] == 1 and len(warned) == 1
    assert f"1 image had more than {EVAL_PRE_NMS_TOPK}" in warned[0] and f"up to {EVAL_PRE_NMS_TOPK + 7}" in warned[0]
    ref = yolo_val_metrics(list(labels), [(table[i][valid[i]], scores[i][valid[i]], classes[i][valid[i]]) for i in range(3)], img_size=S, nc=3)
    assert res["map50"] == ref["map50"] and res["map50_95"] == ref["map50_95"] and res["per_class"] == ref["per_class"]
    # The extra class-1 box ranks below every true one: no AP drops (yolo val's perfect AP is 0.995).
    assert res["coco_map50"] == pytest.approx(1.0) and res["map50"] == pytest.approx(0.995) and res["precision"] < 1.0


def test_rect_batches_frame_as_yolo_val(oracles, tmp_path):
    """``evaluate_model(rect=True)``'s framing equals ultralytics' val dataset with ``rect=True``
    (what ``yolo val`` builds): the same images in the same order (sorted by aspect ratio), each
    batch's frame shape, every pixel of the letterboxed frames, and the labels normalised to them."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _datasets import make_yaml_dataset

    from jaxyolo.data import load_data
    from jaxyolo.evaluate.model import _rect_batches, rect_batch_shapes

    yaml, _ = make_yaml_dataset(tmp_path / "d", n_train=1, n_val=7)
    S, B = 64, 3
    data = load_data(str(yaml), "val", img_size=S)
    assert len({tuple(s) for s in data.orig_shapes}) >= 3  # wide, tall and square images
    oracles.torch()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": S, "rect": True, "cache": False})
    ds = build_yolo_dataset(cfg, check_det_dataset(str(yaml))["val"], B, check_det_dataset(str(yaml)), mode="val", stride=32)
    ours = list(_rect_batches(data, batch_size=B, max_boxes=8, stride=32))
    order, frames = rect_batch_shapes(data.orig_shapes, batch_size=B, img_size=S)
    np.testing.assert_array_equal(frames, ds.batch_shapes)
    assert [str(data.files[i]) for i in order] == [str(f) for f in ds.im_files]
    k = 0
    for images, idx, labels, (h, w), n in ours:
        for j in range(n):
            item = ds[k]
            assert str(data.files[idx[j]]) == item["im_file"]
            theirs = item["img"].numpy().transpose(1, 2, 0)  # CHW (RGB after Format) -> HWC
            assert theirs.shape == (h, w, 3)
            np.testing.assert_array_equal(images[j], theirs)
            ref = np.concatenate([item["cls"].numpy().reshape(-1, 1), item["bboxes"].numpy().reshape(-1, 4)], 1)
            np.testing.assert_allclose(labels[j], ref, atol=2e-6)
            k += 1
    assert k == len(ds) and len({(f[0], f[1]) for f in frames}) >= 2
