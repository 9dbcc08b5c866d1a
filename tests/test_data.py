"""Data: the embedded dataset, static-shape grain batching, flips, YOLO directories."""

import numpy as np
import pytest
from PIL import Image

from jaxyolo import Targets
from jaxyolo.data import (
    SHAPE_CLASSES,
    DataError,
    collate,
    eval_batches,
    hflip,
    iterate,
    load_embedded,
    load_yolo_dir,
    render_shapes_image,
    train_batches,
)


@pytest.fixture(scope="module")
def shapes():
    return load_embedded("train", img_size=128, size=300)


def test_embedded_is_deterministic_and_splits_differ():
    a, la = render_shapes_image(1, 7, img_size=96)
    b, lb = render_shapes_image(1, 7, img_size=96)
    c, _ = render_shapes_image(2, 7, img_size=96)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8


def test_embedded_content(shapes):
    labels = np.concatenate([lab for lab in shapes.labels])
    counts = np.array([len(lab) for lab in shapes.labels])
    assert len(SHAPE_CLASSES) >= 5 and shapes.nc == len(SHAPE_CLASSES)
    assert set(np.unique(labels[:, 0]).astype(int)) == set(range(shapes.nc))  # every class occurs
    assert 0.03 < np.mean(counts == 0) < 0.15  # some empty images
    assert counts.max() >= 8 and np.mean(counts) > 3  # several objects per image
    side = np.sqrt(labels[:, 3] * labels[:, 4]) * 128
    assert side.min() < 10 and side.max() > 60  # tiny to large
    assert np.all((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1))
    x1, x2 = labels[:, 1] - labels[:, 3] / 2, labels[:, 1] + labels[:, 3] / 2
    assert np.all(x1 >= -1e-6) and np.all(x2 <= 1 + 1e-6)
    # overlaps occur
    overlapping = 0
    for lab in shapes.labels[:100]:
        for i in range(len(lab)):
            for j in range(i):
                a, b = lab[i], lab[j]
                if abs(a[1] - b[1]) < (a[3] + b[3]) / 2 and abs(a[2] - b[2]) < (a[4] + b[4]) / 2:
                    overlapping += 1
    assert overlapping > 10


def test_labels_are_tight_boxes():
    """A square's label is exactly its pixels: every pixel inside the box has the square's
    colour (up to the noise) and the pixel rows/columns just outside it do not.  Checked on
    every square that no later shape touches (later shapes paint over earlier ones)."""
    s = 128
    checked = 0
    for idx in range(60):
        img, lab = render_shapes_image(3, idx, img_size=s)
        img = img.astype(float)
        corners = np.rint(np.stack([lab[:, 1] - lab[:, 3] / 2, lab[:, 2] - lab[:, 4] / 2,
                                    lab[:, 1] + lab[:, 3] / 2, lab[:, 2] + lab[:, 4] / 2], -1) * s).astype(int)
        for i, (c, *_) in enumerate(lab):
            x1, y1, x2, y2 = corners[i]
            later = corners[i + 1 :]
            touched = (np.minimum(x2, later[:, 2]) >= np.maximum(x1, later[:, 0])) & (
                np.minimum(y2, later[:, 3]) >= np.maximum(y1, later[:, 1]))
            if SHAPE_CLASSES[int(c)] != "square" or touched.any():
                continue
            inside = img[y1:y2, x1:x2].reshape(-1, 3)
            colour = np.median(inside, 0)
            assert inside.std(0).max() < 15, (idx, i)  # one colour plus the noise (sigma 6)
            outside = [img[y1:y2, x1 - 1] if x1 > 0 else None, img[y1:y2, x2] if x2 < s else None,
                       img[y1 - 1, x1:x2] if y1 > 0 else None, img[y2, x1:x2] if y2 < s else None]
            for side in (o for o in outside if o is not None):
                assert np.mean(np.abs(side - colour).sum(-1) < 60) < 0.5, (idx, i)  # the box ends here
            checked += 1
    assert checked >= 10, f"only {checked} untouched squares in 60 images"


def test_static_shape_batches_and_resume(shapes):
    ds = train_batches(shapes, batch_size=16, max_boxes=12, seed=0, epoch=3)
    assert len(ds) == len(shapes) // 16
    first = ds[5]
    images, targets = collate(first)
    assert images.shape == (16, 128, 128, 3) and images.dtype == np.uint8
    assert targets.boxes.shape == (16, 12, 4) and targets.classes.shape == (16, 12) and targets.mask.shape == (16, 12)
    assert isinstance(targets, Targets)
    # Padded rows are zero, real rows come first.
    m = targets.mask
    assert np.all(np.diff(m.astype(int), axis=1) <= 0)
    assert np.all(targets.boxes[~m] == 0)
    # Random access == iterating from that batch (what --resume relies on).
    again = next(iterate(ds, 5))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    # Another epoch is another order.
    other = train_batches(shapes, batch_size=16, max_boxes=12, seed=0, epoch=4)[5]
    assert not np.array_equal(first["image"], other["image"])


def test_hflip():
    img = np.zeros((32, 32, 3), np.uint8)
    img[4:12, 2:10] = 255  # box x in [2, 10), y in [4, 12)
    ex = {"image": img, "boxes": np.array([[6 / 32, 8 / 32, 8 / 32, 8 / 32], [0, 0, 0, 0]], np.float32),
          "classes": np.array([1, 0], np.int32), "mask": np.array([True, False])}

    class Always:
        def uniform(self):
            return 0.0

    out = hflip(ex, Always(), 0.5)
    ys, xs = np.nonzero(out["image"][..., 0])
    assert xs.min() == 32 - 10 and xs.max() == 32 - 2 - 1
    np.testing.assert_allclose(out["boxes"][0], [1 - 6 / 32, 8 / 32, 8 / 32, 8 / 32])
    np.testing.assert_array_equal(out["boxes"][1], 0)  # padding untouched
    cx = out["boxes"][0, 0] * 32
    assert cx - 4 == xs.min() and cx + 4 == xs.max() + 1


def test_eval_batches_pad_the_last_batch(shapes):
    sizes = [(b["image"].shape[0], n) for b, n in eval_batches(shapes, batch_size=64, max_boxes=12)]
    assert sizes[:-1] == [(64, 64)] * 4 and sizes[-1] == (64, 300 - 256)


# ------------------------------------------------------------ YOLO dirs


def _write_dataset(root, n=3, lines=None, nc=None):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(root / "images" / "train" / f"im{i}.png")
        text = lines[i] if lines is not None else f"{i % 2} 0.5 0.5 0.2 0.3\n"
        if text is not None:
            (root / "labels" / "train" / f"im{i}.txt").write_text(text)
    if nc is not None:
        (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(nc)))
    return root


def test_yolo_dir_loads(tmp_path):
    root = _write_dataset(tmp_path / "ds", lines=["0 0.5 0.5 0.2 0.3\n1 0.1 0.2 0.1 0.1\n", None, "\n"], nc=3)
    d = load_yolo_dir(root, "train", img_size=64)
    assert d.images.shape == (3, 64, 64, 3) and d.names == ("c0", "c1", "c2")
    np.testing.assert_allclose(d.labels[0], [[0, 0.5, 0.5, 0.2, 0.3], [1, 0.1, 0.2, 0.1, 0.1]])
    assert d.labels[1].shape == (0, 5) and d.labels[2].shape == (0, 5)  # no file / blank file: background


def test_yolo_dir_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_yolo_dir(tmp_path / "missing", "train")
    root = _write_dataset(tmp_path / "nolabels", lines=[None, None, None])
    with pytest.raises(DataError, match="no label files"):
        load_yolo_dir(root, "train")
    root = _write_dataset(tmp_path / "fields", lines=["0 0.5 0.5 0.2\n", "0 0.5 0.5 0.2 0.2\n", ""])
    with pytest.raises(DataError, match=r"im0\.txt:1: expected 5 fields"):
        load_yolo_dir(root, "train")
    root = _write_dataset(tmp_path / "cls", lines=["0 0.5 0.5 0.2 0.2\n", "0 0.5 0.5 0.2 0.2\n4 0.5 0.5 0.2 0.2\n", ""], nc=3)
    with pytest.raises(DataError, match=r"im1\.txt:2: class id 4 >= nc=3"):
        load_yolo_dir(root, "train")
    root = _write_dataset(tmp_path / "range", lines=["0 1.5 0.5 0.2 0.2\n", "", ""])
    with pytest.raises(DataError, match=r"im0\.txt:1: box"):
        load_yolo_dir(root, "train")
    root = _write_dataset(tmp_path / "corrupt")
    (root / "images" / "train" / "im1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*im1\.png"):
        load_yolo_dir(root, "train")
