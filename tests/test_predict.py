"""Predict core on ultralytics' bundled photos: mapping back through the letterbox, drawing, YOLO txt."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo.data.formats import DataError
from jaxyolo.data.images import decode_image, letterbox
from jaxyolo.predict import (
    PALETTE,
    Detections,
    draw_detections,
    font_size,
    iter_predictions,
    line_width,
    list_images,
    nms_predict_fn,
    place_labels,
    predict_paths,
    save_prediction,
    yolo_txt_lines,
)

S = 160
NAMES = ("person", "bus", "tie")
# Known detections in ORIGINAL pixels (x1, y1, x2, y2, score, class) for each photo.
KNOWN = {
    "bus.jpg": np.asarray([[50.0, 400.0, 250.0, 900.0, 0.91, 0], [20.5, 230.0, 800.0, 750.0, 0.88, 1], [660, 380, 810, 880, 0.3, 0]]),
    "zidane.jpg": np.asarray([[120.0, 190.0, 1120.0, 710.0, 0.93, 0], [740.0, 30.0, 1150.0, 715.0, 0.86, 0], [430, 440, 520, 715, 0.2, 2]]),
}


def assets():
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for name in KNOWN:
        (d / name).write_bytes((assets() / name).read_bytes())
    return d


def fake_predict_fn(folder, calls):
    """A predict_fn that recognises each letterboxed photo and returns its
    KNOWN boxes mapped into the frame (the forward letterbox), padded to D = 5."""
    frames = {}
    for name, known in KNOWN.items():
        img = decode_image(folder / name)
        frame, (top, left, h, w) = letterbox(img, S)
        h0, w0 = img.shape[:2]
        b = known[:, :4] * [w / w0, h / h0, w / w0, h / h0] + [left, top, left, top]
        frames[name] = (frame, b, known[:, 4], known[:, 5])

    def fn(images):
        images = np.asarray(images)
        calls.append(images.shape)
        out = (np.zeros((len(images), 5, 4), np.float32), np.zeros((len(images), 5), np.float32),
               np.zeros((len(images), 5), np.int32), np.zeros((len(images), 5), bool))
        for i, im in enumerate(images):
            for frame, b, s, c in frames.values():
                if np.array_equal(im, frame):
                    n = len(b)
                    out[0][i, :n], out[1][i, :n], out[2][i, :n], out[3][i, :n] = b, s, c, True
        return out

    return fn


def test_list_images(tmp_path, photos):
    assert list_images(photos) == [photos / "bus.jpg", photos / "zidane.jpg"]
    assert list_images(photos / "bus.jpg") == [photos / "bus.jpg"]
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"no images .* in "):
        list_images(tmp_path)
    with pytest.raises(DataError, match=r"notes\.txt is not an image"):
        list_images(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        list_images(tmp_path / "nowhere")


def test_boxes_map_back_through_the_letterbox(photos, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths = [photos / "bus.jpg", tmp_path / "broken.jpg", photos / "zidane.jpg"]
    calls, warnings = [], []
    dets = predict_paths(paths, fake_predict_fn(photos, calls), img_size=S, conf=0.25, batch_size=2, warn=warnings.append)
    assert calls == [(2, S, S, 3), (2, S, S, 3)]  # static batch: the last one padded
    assert [d.path.name for d in dets] == ["bus.jpg", "zidane.jpg"]
    assert len(warnings) == 1 and "skipped 1 of 3 images" in warnings[0] and "broken.jpg" in warnings[0]
    for d in dets:
        known = KNOWN[d.path.name]
        keep = known[:, 4] > 0.25  # the conf filter
        assert d.orig_shape == decode_image(d.path).shape[:2]
        np.testing.assert_allclose(d.boxes, known[keep, :4], atol=2e-3)  # forward then back: float rounding only
        np.testing.assert_allclose(d.scores, known[keep, 4], rtol=1e-6)
        np.testing.assert_array_equal(d.classes, known[keep, 5])
    with pytest.raises(DataError, match=r"no image can be read; skipped 1 of 1"):
        predict_paths([tmp_path / "broken.jpg"], fake_predict_fn(photos, []), img_size=S)


def test_boxes_are_clipped_to_the_original():
    # zidane 1280 x 720 in a 160 frame: scale 1/8, content rows 35..125
    fn = lambda images: (np.asarray([[[-30.0, 50.0, 200.0, 150.0]]]), np.asarray([[0.9]]), np.asarray([[1]]), np.asarray([[True]]))  # noqa: E731
    det = predict_paths([assets() / "zidane.jpg"], fn, img_size=S, batch_size=1)[0]
    assert det.orig_shape == (720, 1280)
    np.testing.assert_allclose(det.boxes[0], [0, (50 - 35) * 8, 1280, 720])


def test_txt_lines_match_upstream_results(tmp_path):
    """Our lines == ultralytics Results.save_txt(save_conf=True) for the same boxes."""
    from jaxyolo.testing import oracles

    torch = oracles.torch()
    from ultralytics.engine.results import Results

    img = decode_image(assets() / "bus.jpg")
    known = KNOWN["bus.jpg"]
    det = Detections(Path("bus.jpg"), img.shape[:2], known[:, :4].astype(np.float32), known[:, 4].astype(np.float32), known[:, 5].astype(np.int32))
    res = Results(img[..., ::-1], path="bus.jpg", names=dict(enumerate(NAMES)), boxes=torch.tensor(np.concatenate([known[:, :4], known[:, 4:]], 1), dtype=torch.float32))
    res.save_txt(tmp_path / "ref.txt", save_conf=True)
    assert yolo_txt_lines(det) == (tmp_path / "ref.txt").read_text().splitlines()
    assert yolo_txt_lines(det)[0].startswith("0 0.185185 0.601852 0.246914 0.462963 0.91")


def test_drawn_boxes_and_labels(photos):
    img = decode_image(photos / "zidane.jpg")
    known = KNOWN["zidane.jpg"]
    det = Detections(photos / "zidane.jpg", img.shape[:2], known[:, :4].astype(np.float32), known[:, 4].astype(np.float32), known[:, 5].astype(np.int32))
    out = draw_detections(img, det, NAMES)
    assert out.shape == img.shape and out.dtype == np.uint8
    lw = line_width(img.shape[:2])
    assert lw == 3
    changed = (out != img).any(-1)
    for (x1, y1, x2, y2, s, c) in known[[2]]:  # the small 'tie' box, not covered by the others
        x1, y1, x2, y2, c = int(x1), int(y1), int(x2), int(y2), int(c)
        color = PALETTE[c % len(PALETTE)]
        mid = (y1 + y2) // 2
        assert (out[mid, x1 : x1 + lw] == color).all() and (out[mid, x2 - lw : x2] == color).all()  # left/right edges
        assert (out[y2 - lw : y2, (x1 + x2) // 2] == color).all()  # bottom edge
        assert not changed[mid, x1 - 1] and not changed[mid, x2] and not changed[y2, (x1 + x2) // 2]  # only inside the bounds
        assert not changed[mid, x1 + lw : x2 - lw].any()  # outlines only
        # the label: a filled box-colour background above the box, holding text in black or white
        label = out[y1 - 12 : y1, x1 : x1 + 40]
        assert (label == color).all(-1).mean() > 0.5
        text = np.asarray([0, 0, 0]) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else np.asarray([255, 255, 255])
        assert (label == text).all(-1).sum() > 5
    # the two people: their colour is PALETTE[0] along their left edges
    for x1, y1, x2, y2, *_ in known[:2]:
        assert (out[int((y1 + y2) // 2), int(x1) : int(x1) + lw] == PALETTE[0]).all()


def test_labels_scale_with_the_image_and_stay_inside_it_without_covering_each_other():
    """On a 128 px image: a 10 px font (35 px on zidane.jpg as upstream's
    Annotator, 22 at 640 px, 8 px at 64 px), every label inside the image,
    none covering another where a free place exists, the best box's label
    above it; what is drawn is where place_labels says."""
    assert [font_size(s) for s in ((720, 1280), (640, 640), (128, 128), (96, 96), (64, 64), (32, 400))] == [35, 22, 10, 8, 8, 8]
    assert [line_width(s) for s in ((720, 1280), (128, 128))] == [3, 2]
    img = np.full((128, 128, 3), 200, np.uint8)
    boxes = np.array([[60, 20, 100, 60], [100, 22, 128, 62], [5, 5, 40, 40], [10, 70, 50, 120], [52, 72, 90, 118], [95, 80, 127, 127]], np.float32)
    det = Detections(Path("x.png"), (128, 128), boxes, np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45], np.float32), np.arange(6, dtype=np.int32))
    names = ["circle", "square", "triangle", "star", "cross", "ring"]
    out = draw_detections(img, det, names)
    sizes = [(58, 15), (62, 15), (72, 15), (48, 15), (58, 15), (50, 15)]
    spots = place_labels(boxes, sizes, (128, 128))
    assert (spots[:, :2] >= 0).all() and (spots[:, 2:] <= 128).all()
    assert spots[0].tolist() == [60, 20 - 15, 60 + 58, 20]  # the best: above its box
    assert spots[1, 2] == 128  # at the right edge: moved left into the image
    for i in range(6):
        for j in range(i):
            a, b = spots[i], spots[j]
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (i, j, spots)
    # Each drawn label's background: the box colour fills most of the place it was given.
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=10)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    drawn = [(r - l + 2, b - t + 2) for l, t, r, b in (draw.textbbox((0, 0), f"{n} {s:.2f}", font=font) for n, s in zip(names, det.scores))]
    for k, (x1, y1, x2, y2) in enumerate(place_labels(boxes, drawn, (128, 128)).tolist()):
        assert x2 <= 128 and y2 <= 128
        patch = out[y1:y2, x1:x2]
        assert (patch == PALETTE[k]).all(-1).mean() > 0.4, k


def test_save_prediction_writes_image_and_txt(photos, tmp_path):
    calls = []
    results = list(iter_predictions([photos / "bus.jpg", photos / "zidane.jpg"], fake_predict_fn(photos, calls), img_size=S, conf=0.25))
    for det, image in results:
        target = save_prediction(det, image, tmp_path / "out", NAMES, save_txt=True)
        assert target == tmp_path / "out" / det.path.name
        np.testing.assert_array_equal(decode_image(target).shape, image.shape)
        lines = (tmp_path / "out" / "labels" / f"{det.path.stem}.txt").read_text().splitlines()
        assert lines == yolo_txt_lines(det) and len(lines) == len(det)
        # the txt lines read back as the detections
        back = np.asarray([[float(v) for v in ln.split()] for ln in lines])
        h0, w0 = det.orig_shape
        xyxy = np.stack([(back[:, 1] - back[:, 3] / 2) * w0, (back[:, 2] - back[:, 4] / 2) * h0,
                         (back[:, 1] + back[:, 3] / 2) * w0, (back[:, 2] + back[:, 4] / 2) * h0], 1)
        np.testing.assert_allclose(xyxy, det.boxes, atol=0.01)
        np.testing.assert_allclose(back[:, 5], det.scores, atol=1e-5)
    empty = Detections(photos / "bus.jpg", results[0][0].orig_shape, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    save_prediction(empty, results[0][1], tmp_path / "out2", NAMES, save_txt=True)
    assert (tmp_path / "out2" / "bus.jpg").is_file() and not (tmp_path / "out2" / "labels").exists()  # as upstream: no empty txt


def test_nms_predict_fn():
    boxes = jnp.asarray([[[10, 10, 50, 50], [11, 11, 51, 51], [100, 100, 140, 150], [0, 0, 5, 5]]], jnp.float32)
    scores = jnp.asarray([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.6], [0.1, 0.0]]], jnp.float32)
    b, s, c, v = nms_predict_fn(lambda im: (boxes, scores), conf=0.25, iou=0.7, max_det=5)(jnp.zeros((1, 32, 32, 3), jnp.uint8))
    assert np.asarray(v[0]).tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(np.asarray(s[0, :2]), [0.9, 0.6])
    assert np.asarray(c[0, :2]).tolist() == [0, 1]
