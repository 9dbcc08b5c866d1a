"""Data: the embedded dataset, the input pipeline (batches, prefetch), YOLO directories."""

import numpy as np
import pytest
from PIL import Image

from jaxyolo.data import (
    SHAPE_CLASSES,
    DataError,
    DetectionData,
    Prefetcher,
    TrainBatches,
    epoch_permutation,
    eval_batches,
    load_embedded,
    load_data,
    render_shapes_image,
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


def test_embedded_render_threads_give_the_serial_result():
    """``make_shapes_dataset`` renders on threads; every image is the one
    ``render_shapes_image`` draws for its index, whatever the thread count."""
    from jaxyolo.data.shapes import make_shapes_dataset

    imgs, labs = make_shapes_dataset(70, seed=5, img_size=64, workers=3)
    one, one_labs = make_shapes_dataset(70, seed=5, img_size=64, workers=1)
    np.testing.assert_array_equal(imgs, one)
    for i in (0, 33, 69):
        img, lab = render_shapes_image(5, i, img_size=64)
        np.testing.assert_array_equal(imgs[i], img)
        np.testing.assert_array_equal(labs[i], lab)
    assert all(np.array_equal(a, b) for a, b in zip(labs, one_labs))
    assert len({im.tobytes() for im in imgs}) == 70


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
    tb = TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0)
    assert tb.steps_per_epoch == len(shapes) // 16
    first = tb.batch(3, 5)
    assert first["image"].shape == (16, 1, 128, 128, 3) and first["image"].dtype == np.uint8
    assert first["boxes"].shape == (16, 1, 12, 4) and first["classes"].shape == (16, 1, 12) and first["mask"].shape == (16, 1, 12)
    np.testing.assert_array_equal(first["rects"], np.broadcast_to([0, 0, 128, 128], (16, 1, 4)))  # the shapes fill the frame
    # Batch k of epoch e is rows k*B..(k+1)*B of the epoch's permutation, gathered with labels.
    idx = epoch_permutation(len(shapes), seed=0, epoch=3)[5 * 16 : 6 * 16]
    np.testing.assert_array_equal(first["image"][:, 0], shapes.images[idx])
    for row, i in enumerate(idx):
        lab = shapes.labels[i][:12]
        np.testing.assert_array_equal(first["mask"][row, 0], np.arange(12) < len(lab))
        np.testing.assert_array_equal(first["boxes"][row, 0, : len(lab)], lab[:, 1:])
        np.testing.assert_array_equal(first["classes"][row, 0, : len(lab)], lab[:, 0].astype(int))
    # Padded rows are zero, real rows come first.
    m = first["mask"]
    assert np.all(np.diff(m.astype(int), axis=-1) <= 0)
    assert np.all(first["boxes"][~m] == 0)
    # A fresh pipeline (a resumed process) gives the identical batch at the same position.
    again = TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0).batch(3, 5)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    # Another epoch is another order; another seed too.
    assert not np.array_equal(first["image"], tb.batch(4, 5)["image"])
    assert not np.array_equal(first["image"], TrainBatches(shapes, batch_size=16, max_boxes=12, seed=1).batch(3, 5)["image"])
    # Each epoch visits every image at most once (the last partial batch dropped).
    seen = np.concatenate([tb.indices(2, k)[:, 0] for k in range(tb.steps_per_epoch)])
    assert len(np.unique(seen)) == len(seen) == tb.steps_per_epoch * 16


def test_mosaic_batches_gather_four_frames(shapes):
    tb = TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0)
    plain, mosaic = tb.batch(3, 5), tb.batch(3, 5, mosaic=True)
    assert mosaic["image"].shape == (16, 4, 128, 128, 3) and mosaic["boxes"].shape == (16, 4, 12, 4)
    # Frame 0 is the sample itself; frames 1-3 are other images, drawn from (seed, epoch).
    for k in plain:
        np.testing.assert_array_equal(mosaic[k][:, :1], plain[k])
    idx = tb.indices(3, 5, mosaic=True)
    np.testing.assert_array_equal(mosaic["image"], shapes.images[idx])
    np.testing.assert_array_equal(idx, TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0).indices(3, 5, mosaic=True))
    others = np.concatenate([tb.indices(3, k, mosaic=True)[:, 1:] for k in range(tb.steps_per_epoch)])
    assert len(np.unique(others)) > 0.8 * len(shapes)  # spread over the whole set
    assert not np.array_equal(idx, tb.indices(4, 5, mosaic=True))


def test_batches_split_across_processes(shapes):
    whole = TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0).batch(1, 2)
    parts = [TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0, process_index=p, process_count=4).batch(1, 2) for p in range(4)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        TrainBatches(shapes, batch_size=16, max_boxes=12, seed=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than batch=400"):
        TrainBatches(shapes, batch_size=400, max_boxes=12, seed=0)


def test_positions_cross_epochs_and_stop():
    d = DetectionData(np.zeros((10, 1, 1, 3), np.uint8), tuple(np.zeros((0, 5), np.float32) for _ in range(10)), ("a",))
    tb = TrainBatches(d, batch_size=3, max_boxes=2, seed=0)  # 3 batches per epoch
    assert list(tb.positions(0, 2, epochs=2)) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert list(tb.positions(1, 1, epochs=3, max_steps=6, done=4)) == [(1, 1), (1, 2)]
    assert list(tb.positions(2, 0, epochs=2)) == []


def test_prefetcher_order_errors_and_close():
    import threading

    import jax

    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    src = ((i, {"x": np.full((2,), i)}) for i in range(7))
    with Prefetcher(src, sharding=sh, depth=2) as pf:
        got = [(t, b["x"]) for t, b in pf]
    assert [(t, int(x[0])) for t, x in got] == [(i, i) for i in range(7)]
    assert all(isinstance(x, jax.Array) and x.sharding == sh for _, x in got)  # on the device, with the sharding

    def bad():
        yield 0, {"x": np.zeros(1)}
        raise RuntimeError("decode failed")

    with Prefetcher(bad(), sharding=sh, depth=2) as pf, pytest.raises(RuntimeError, match="decode failed"):
        list(pf)
    # Leaving early stops the thread, which must not keep gathering.
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i, {"x": np.zeros(1)}
            i += 1

    with Prefetcher(endless(), sharding=sh, depth=2) as pf:
        next(iter(pf))
    assert not any(t.name == "jaxyolo-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 5  # one consumed + at most depth queued + one in hand


def test_eval_batches_pad_the_last_batch(shapes):
    got = list(eval_batches(shapes, batch_size=64, max_boxes=12))
    sizes = [(b["image"].shape[0], n) for b, n in got]
    assert sizes[:-1] == [(64, 64)] * 4 and sizes[-1] == (64, 300 - 256)
    last, n = got[-1]
    assert not last["mask"][n:].any()  # padding images carry no labels
    np.testing.assert_array_equal(last["image"][:n], shapes.images[256:])


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
    d = load_data(str(root), "train", img_size=64)
    assert d.images.shape == (3, 64, 64, 3) and d.names == ("c0", "c1", "c2")
    # 60x40 letterboxed into 64x64: the width fills the frame, the height is centred.
    top, left, h, w = d.content_rects[0]
    assert (left, w) == (0, 64) and h == 43 and top == 10
    assert np.all(d.images[0, :top] == 114) and np.all(d.images[0, top + h :] == 114)
    np.testing.assert_allclose(d.labels[0][:, [0, 1, 3]], [[0, 0.5, 0.2], [1, 0.1, 0.1]], atol=1e-6)
    np.testing.assert_allclose(d.labels[0][:, 2], (top + np.array([0.5, 0.2]) * h) / 64, atol=1e-6)
    np.testing.assert_allclose(d.labels[0][:, 4], np.array([0.3, 0.1]) * h / 64, atol=1e-6)
    assert d.labels[1].shape == (0, 5) and d.labels[2].shape == (0, 5)  # no file / blank file: background


def test_yolo_dir_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing"), "train")
    root = _write_dataset(tmp_path / "nolabels", lines=[None, None, None])
    with pytest.raises(DataError, match="no label files"):
        load_data(str(root), "train")
    root = _write_dataset(tmp_path / "fields", lines=["0 0.5 0.5 0.2\n", "0 0.5 0.5 0.2 0.2\n", ""])
    with pytest.raises(DataError, match=r"im0\.txt:1: expected 5 fields"):
        load_data(str(root), "train")
    root = _write_dataset(tmp_path / "cls", lines=["0 0.5 0.5 0.2 0.2\n", "0 0.5 0.5 0.2 0.2\n4 0.5 0.5 0.2 0.2\n", ""], nc=3)
    with pytest.raises(DataError, match=r"im1\.txt:2: class id 4 >= nc=3"):
        load_data(str(root), "train")
    root = _write_dataset(tmp_path / "range", lines=["0 1.5 0.5 0.2 0.2\n", "", ""])
    with pytest.raises(DataError, match=r"im0\.txt:1: box"):
        load_data(str(root), "train")
    # A corrupt image is skipped with one warning line naming it; all corrupt is an error.
    root = _write_dataset(tmp_path / "corrupt")
    (root / "images" / "train" / "im1.png").write_bytes(b"not a png")
    warnings = []
    d = load_data(str(root), "train", warn=warnings.append)
    assert len(d) == 2 and len(warnings) == 1 and "im1.png" in warnings[0]
    for i in range(3):
        (root / "images" / "train" / f"im{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="im0.png"):
        load_data(str(root), "train", warn=warnings.append)
