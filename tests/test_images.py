"""Decode / letterbox / cache against ultralytics' own dataset (called, pixel for pixel)."""

import os
from pathlib import Path

import numpy as np
import pytest
from _datasets import make_coco_dataset, make_yaml_dataset, write_image

from jaxyolo.data import images as images_mod
from jaxyolo.data.formats import DataError, discover
from jaxyolo.data.images import decode_image, letterbox, letterbox_labels, load_dataset, load_split


def assets():
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets"


def _upstream_val_dataset(img_dir, names, imgsz):
    """ultralytics' YOLODataset in validation mode: load_image + LetterBox + Format."""
    from jaxyolo.testing import oracles

    oracles.torch()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset

    return YOLODataset(img_path=str(img_dir), data={"names": dict(enumerate(names)), "channels": 3}, imgsz=imgsz,
                       augment=False, cache=False, hyp=get_cfg(), batch_size=1, stride=32, rect=False)


def test_decode_matches_cv2_on_the_bundled_photos():
    import cv2

    for name in ("bus.jpg", "zidane.jpg"):
        ours = decode_image(assets() / name)
        ref = cv2.imread(str(assets() / name))[..., ::-1]
        assert ours.dtype == np.uint8 and ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("imgsz", [64, 160])
def test_letterbox_matches_upstream_dataset(tmp_path, imgsz):
    """Pixels and boxes of every image of a mixed-format split (JPEG, PNG, BMP,
    WebP, grayscale, the two photos) equal YOLODataset's validation samples."""
    yaml_path, _ = make_yaml_dataset(tmp_path / "ds", n_train=5, n_val=1)
    img_dir = tmp_path / "ds" / "images" / "train"
    for name in ("bus.jpg", "zidane.jpg"):
        (img_dir / name).write_bytes((assets() / name).read_bytes())
        (tmp_path / "ds" / "labels" / "train" / (Path(name).stem + ".txt")).write_text("0 0.5 0.5 0.25 0.5\n2 0.1 0.9 0.2 0.2\n")
    data = load_dataset(yaml_path, "train", img_size=imgsz)
    ref = _upstream_val_dataset(img_dir, data.names, imgsz)
    assert [Path(f).name for f in ref.im_files] == [Path(f).name for f in data.files]
    for i in range(len(data)):
        r = ref[i]
        np.testing.assert_array_equal(data.images[i], r["img"].numpy().transpose(1, 2, 0))  # RGB
        np.testing.assert_allclose(data.labels[i][:, 1:], r["bboxes"].numpy(), atol=1e-6)
        np.testing.assert_array_equal(data.labels[i][:, 0], r["cls"].numpy()[:, 0])
        assert tuple(data.orig_shapes[i]) == tuple(r["ori_shape"])
        top, left, h, w = data.content[i]
        assert (h, w) == tuple(r["resized_shape"]) or max(h, w) == imgsz
        assert max(h, w) == imgsz and (imgsz - h) // 2 == top and (imgsz - w) // 2 == left
        pad = np.ones((imgsz, imgsz), bool)
        pad[top : top + h, left : left + w] = False
        assert np.all(data.images[i][pad] == 114)


def test_letterbox_geometry():
    img = np.arange(30 * 7 * 3, dtype=np.uint8).reshape(30, 7, 3)
    out, rect = letterbox(img, 64)
    assert rect.tolist() == [0, 24, 64, 15]  # w = ceil(7 * 64 / 30) = 15, left = (64 - 15) // 2
    lab = np.asarray([[1, 0.5, 0.5, 1.0, 1.0], [0, 0.0, 0.25, 0.0, 0.5]], np.float32)
    np.testing.assert_allclose(letterbox_labels(lab, rect, 64), [[1, 31.5 / 64, 0.5, 15 / 64, 1.0], [0, 24 / 64, 0.25, 0.0, 0.5]])
    out2, rect2 = letterbox(np.zeros((64, 64, 3), np.uint8), 64)  # already S x S: no resize, no pad
    assert rect2.tolist() == [0, 0, 64, 64] and not out2.any()


def test_modes_and_exif_like_cv2(tmp_path):
    """Grayscale, RGBA, palette, 16-bit and an EXIF-rotated JPEG decode as cv2.imread(IMREAD_COLOR)."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    Image.fromarray(rng.integers(0, 65536, (23, 37), dtype=np.uint16)).save(tmp_path / "g16.png")
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    for name in ("l.png", "rgba.png", "p.png", "g16.png", "rot.jpg"):
        ours = decode_image(tmp_path / name)
        ref = cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(ours, ref, err_msg=name)
    assert decode_image(tmp_path / "rot.jpg").shape == (37, 23, 3)


def test_unreadable_images_skipped_with_one_warning(tmp_path):
    yaml_path, expected = make_yaml_dataset(tmp_path / "ds", n_train=4, n_val=1)
    d = tmp_path / "ds" / "images" / "train"
    (d / "bad1.jpg").write_bytes(b"not a jpeg")
    (d / "bad2.png").write_bytes(b"")
    write_image(d / "tiny.png", 9, 40)  # < 10 px: corrupt for upstream's check_image
    (d / "bad3.jpg").write_bytes((d / "im000.jpg").read_bytes()[:50])  # truncated
    warnings = []
    data = load_dataset(yaml_path, "train", img_size=64, warn=warnings.append)
    assert len(data) == len(expected["train"][0])
    assert [Path(f).name for f in data.files] == [f.name for f in expected["train"][0]]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "skipped 4 of 9 images" in warnings[0] and "bad1.jpg" in warnings[0] and "and 1 more" in warnings[0]
    for i, lab in enumerate(expected["train"][1]):  # the labels stay with their images
        assert len(data.labels[i]) == len(lab)
    only_bad = tmp_path / "bad"
    (only_bad / "images" / "train").mkdir(parents=True)
    (only_bad / "images" / "train" / "x.jpg").write_bytes(b"junk")
    (only_bad / "labels" / "train").mkdir(parents=True)
    (only_bad / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"no image can be read; skipped 1 of 1 images .*x\.jpg"):
        load_dataset(only_bad, "train", img_size=64)


def test_coco_size_mismatch_is_skipped(tmp_path):
    ann, (files, _, _) = make_coco_dataset(tmp_path / "coco", n=3)
    write_image(files[1], 50, 60)  # the JSON says 300 x 200
    warnings = []
    data = load_dataset(tmp_path / "coco", "val", img_size=64, warn=warnings.append)
    assert len(data) == 2 and "differs from the annotation's 200x300" in warnings[0]


def test_cache_second_load_decodes_nothing(tmp_path, monkeypatch):
    yaml_path, _ = make_yaml_dataset(tmp_path / "ds", n_train=5, n_val=1)
    (tmp_path / "ds" / "images" / "train" / "bad.jpg").write_bytes(b"junk")
    spec = discover(yaml_path, "train")
    cache = tmp_path / "run" / "cache" / "train-64.npy"
    first = load_split(spec, img_size=64, cache=cache, warn=lambda m: None)
    ram = load_split(spec, img_size=64, warn=lambda m: None, workers=1)
    assert isinstance(first.images, np.memmap) and sorted(os.listdir(cache.parent)) == ["train-64.meta.npz", "train-64.npy"]
    np.testing.assert_array_equal(first.images, ram.images)

    def boom(path):
        raise AssertionError("decoded on a cache hit")

    monkeypatch.setattr(images_mod, "decode_image", boom)
    warnings = []
    again = load_split(spec, img_size=64, cache=cache, warn=warnings.append)
    np.testing.assert_array_equal(again.images, ram.images)
    np.testing.assert_array_equal(again.content, ram.content)
    np.testing.assert_array_equal(again.orig_shapes, ram.orig_shapes)
    assert again.files == ram.files and all(np.array_equal(a, b) for a, b in zip(again.labels, ram.labels))
    assert len(warnings) == 1 and "bad.jpg" in warnings[0]  # the skip is reported again from the sidecar
    # Edited labels do not invalidate the images: they are recomputed from the label files.
    lf = tmp_path / "ds" / "labels" / "train" / "im000.txt"
    lf.write_text("1 0.5 0.5 0.5 0.5\n")
    edited = load_split(discover(yaml_path, "train"), img_size=64, cache=cache, warn=lambda m: None)
    np.testing.assert_allclose(edited.labels[0], letterbox_labels([[1, 0.5, 0.5, 0.5, 0.5]], ram.content[0], 64))
    # A changed image (mtime/size) or another size rebuilds.
    monkeypatch.undo()
    f = tmp_path / "ds" / "images" / "train" / "im001.png"
    write_image(f, 500, 300, [[0, 0.5, 0.5, 0.9, 0.9]])
    os.utime(f, ns=(1, 1))
    rebuilt = load_split(spec, img_size=64, cache=cache, warn=lambda m: None)
    assert not np.array_equal(rebuilt.images[1], ram.images[1])
    assert load_split(spec, img_size=96, cache=cache, warn=lambda m: None).images.shape[1:] == (96, 96, 3)
    assert not any(p.name.startswith(".") for p in cache.parent.iterdir())  # no temporary files left
