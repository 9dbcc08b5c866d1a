"""Dataset discovery: data.yaml / COCO / plain layouts against upstream's own resolution."""

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from _datasets import make_coco_dataset, make_plain_dataset, make_yaml_dataset, write_image

from jaxyolo.data.formats import DataError, discover, label_path, read_label_file


def _ultra():
    from jaxyolo.testing import oracles

    oracles.torch()  # the torchvision shim ultralytics' import chain needs
    import ultralytics.data.utils as u

    return u


def _same_rows(a, b):
    """Label rows equal up to row order (upstream re-sorts when deduplicating)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 5), np.asarray(b, np.float32).reshape(-1, 5)
    np.testing.assert_allclose(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])], atol=1e-6)


# ------------------------------------------------------------------ yaml


def test_yaml_matches_upstream_resolution(tmp_path):
    """Split paths as check_det_dataset resolves them, image lists as
    BaseDataset.get_img_files reads them, label files by img2label_paths,
    label rows as verify_image_label parses them."""
    u = _ultra()
    from ultralytics.data.base import BaseDataset

    yaml_path, expected = make_yaml_dataset(tmp_path / "ds")
    ref = u.check_det_dataset(str(yaml_path), autodownload=False)
    stub = types.SimpleNamespace(prefix="", fraction=1.0)
    for split in ("train", "val"):
        spec = discover(yaml_path, split)
        assert spec.names == ("cat", "dog", "bird") and spec.nc == 3
        assert [str(f) for f in spec.files] == BaseDataset.get_img_files(stub, ref[split])
        assert [str(f) for f in spec.files] == [str(f) for f in expected[split][0]]
        assert [str(label_path(f)) for f in spec.files] == u.img2label_paths([str(f) for f in spec.files])
        for f, lab, exp in zip(spec.files, spec.labels, expected[split][1]):
            up = u.verify_image_label((str(f), str(label_path(f)), "", False, 3, 0, 0, False))
            assert up[0] is not None, up[-1]
            _same_rows(lab, up[1])
            np.testing.assert_allclose(lab, exp, atol=1e-6)
        assert len(spec.labels[-1]) == 0  # the background image (no label file)
    assert ref["names"] == dict(enumerate(spec.names))


def test_yaml_paths_lists_and_label_rule(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_image(root / "images" / "a" / "images" / "x.jpg", 40, 50, [[1, 0.5, 0.5, 0.2, 0.2]])
    (root / "images" / "a" / "labels").mkdir(parents=True)
    (root / "images" / "a" / "labels" / "x.txt").write_text("1 0.5 0.5 0.2 0.2\n")  # the LAST /images/ is replaced
    write_image(root / "more" / "y.png", 30, 30)
    (root / "more" / "y.txt").write_text("0 0.5 0.5 0.5 0.5\n")  # no /images/: next to the image
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "d.yaml").write_text("path: ../data\ntrain: [images/a, more]\nvalidation: images/a/images/x.jpg\nnames: [p, q]\n")
    monkeypatch.chdir(tmp_path / "cfg")  # '../data' exists from here: upstream's working-directory rule
    spec = discover(cfg / "d.yaml", "train")
    assert [f.name for f in spec.files] == ["x.jpg", "y.png"] and spec.names == ("p", "q")
    np.testing.assert_allclose(spec.labels[0], [[1, 0.5, 0.5, 0.2, 0.2]])
    np.testing.assert_allclose(spec.labels[1], [[0, 0.5, 0.5, 0.5, 0.5]])
    assert [f.name for f in discover(cfg / "d.yaml", "val").files] == ["x.jpg"]  # 'validation' spelling, a single image
    monkeypatch.chdir(root / "more")  # '../data' does not exist from here: relative to the yaml instead
    assert len(discover(cfg / "d.yaml", "train")) == 2
    # nc alone names the classes; a txt list with a plain relative line (to the list's folder)
    (root / "list.txt").write_text("more/y.png\n")
    (root / "e.yaml").write_text("train: list.txt\nval: list.txt\nnc: 2\n")
    spec = discover(root / "e.yaml", "train")
    assert spec.names == ("class_0", "class_1") and [f.name for f in spec.files] == ["y.png"]


@pytest.mark.parametrize(
    "body, match",
    [
        ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", r"d\.yaml: 'names' has 2 entries but 'nc: 3'"),
        ("train: images/train\nval: images/val\nnames: {0: a, 2: b}\n", r"d\.yaml: 'names' has 2 entries, so its ids must be 0-1; got id 2"),
        ("train: images/train\nval: images/val\nnames: {x: a}\n", r"d\.yaml: 'names' key 'x' is not an integer"),
        ("train: images/train\nnames: [a, b, c]\n", r"d\.yaml: no 'val:' split"),
        ("train: images/train\nval: images/nope\nnames: [a, b, c]\n", r"d\.yaml: 'val' path .*images/nope does not exist"),
        ("train: images/train\nval: empty\nnames: [a, b, c]\n", r"d\.yaml: no images .* in 'val' \(empty\)"),
        ("train: images/train\nval: images/val\nnames: [a]\n", r"im000\.txt:1: class id [12] >= nc=1"),
        ("train: images/train\nval: images/val\nnc: two\n", r"d\.yaml: 'nc: two' must be an integer"),
        ("train: images/train\nval: 3\nnames: [a, b, c]\n", r"d\.yaml: 'val' must be a str or list, not int"),
        ("train: images/train\nval: images/val\n", r"d\.yaml: needs 'names'"),
        ("train: [images/train\n", r"d\.yaml: cannot read the yaml: "),
    ],
)
def test_yaml_errors_are_one_line(tmp_path, body, match):
    root = tmp_path / "ds"
    make_yaml_dataset(root, n_train=1, n_val=1)
    (root / "empty").mkdir()
    (root / "d.yaml").write_text(body)
    with pytest.raises(DataError, match=match) as e:
        discover(root / "d.yaml", "val")
    assert "\n" not in str(e.value)


def test_label_lines(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("\ufeff2 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n0 0.1 0.2 0.3 0.2\n")  # BOM, a duplicate row
    np.testing.assert_allclose(read_label_file(f, None), [[2, 0.5, 0.5, 0.2, 0.2], [0, 0.1, 0.2, 0.3, 0.2]])
    f.write_text("1 0.1 0.1 0.5 0.1 0.5 0.4 0.1 0.4\n")  # a polygon -> its bounding box (segments2boxes)
    np.testing.assert_allclose(read_label_file(f, None), [[1, 0.3, 0.25, 0.4, 0.3]], atol=1e-6)
    for text, match in (
        ("0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.5 0.1 0.5 0.4 0.1 0.4\n", r"l\.txt:2: the file mixes box rows and polygon rows"),
        ("0 0.5 0.5 0.2 0.2 0.1\n", r"l\.txt:1: expected 5 fields"),
        ("1.5 0.5 0.5 0.2 0.2\n", r"l\.txt:1: class id must be a non-negative integer"),
        ("0 0.5 x 0.2 0.2\n", r"l\.txt:1: non-numeric"),
        ("0 0.5 0.5 1.2 0.2\n", r"l\.txt:1: box .* is not normalised"),
    ):
        f.write_text(text)
        with pytest.raises(DataError, match=match):
            read_label_file(f, None)


# ------------------------------------------------------------------ COCO


def test_coco_dir_layout(tmp_path):
    ann, (files, labels, names) = make_coco_dataset(tmp_path / "coco")
    spec = discover(tmp_path / "coco", "val")
    assert spec.names == names == ("car", "train", "kite")
    assert list(spec.files) == files and spec.shapes.tolist() == [[240, 320], [300, 200]] * 2 + [[240, 320]]
    for got, want in zip(spec.labels, labels):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(spec.labels[-1]) == 0  # an image without annotations is a background image
    # a JSON file with an explicit images folder is the same split
    spec2 = discover(ann, "whatever", images=tmp_path / "coco" / "val2017")
    assert spec2.files == spec.files and all(np.array_equal(a, b) for a, b in zip(spec2.labels, spec.labels))
    with pytest.raises(DataError, match=r"no 'train' split \(expected .*instances_train\*\.json\)"):
        discover(tmp_path / "coco", "train")
    with pytest.raises(DataError, match=r"needs its images folder"):
        discover(ann, "val")


def test_coco_matches_upstream_converters(tmp_path):
    """Classes as YOLOX's COCODataset (sorted category ids -> contiguous) and
    its clipped boxes; normalised boxes as ultralytics' convert_coco, except
    that we also clip the edge-crossing box (convert_coco leaves it > 1)."""
    from jaxyolo.testing import oracles

    oracles.torch()
    from ultralytics.data.converter import convert_coco
    from yolox.data.datasets import COCODataset

    ann, _ = make_coco_dataset(tmp_path / "coco")
    spec = discover(tmp_path / "coco", "val")
    shapes = spec.shapes

    # YOLOX: every image resized by r = min(S/h, S/w); undo r to compare pixels.
    yx = COCODataset(data_dir=str(tmp_path / "coco"), json_file=ann.name, name="val2017", img_size=(640, 640))
    assert [Path(a[3]).name for a in yx.annotations] == [f.name for f in spec.files]
    for (res, (h, w), _, _), lab in zip(yx.annotations, spec.labels):
        r = min(640 / h, 640 / w)
        ours = np.stack([(lab[:, 1] - lab[:, 3] / 2) * w, (lab[:, 2] - lab[:, 4] / 2) * h,
                         (lab[:, 1] + lab[:, 3] / 2) * w, (lab[:, 2] + lab[:, 4] / 2) * h, lab[:, 0]], 1)
        keep = (res[:, 2] > res[:, 0]) & (res[:, 3] > res[:, 1])  # YOLOX also keeps zero-width boxes with area > 0
        ref = res[keep] / np.asarray([r, r, r, r, 1.0])
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)

    # ultralytics convert_coco with category_id - 1 classes (cls91to80=False): map ours back to ids.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        convert_coco(str(tmp_path / "coco" / "annotations"), save_dir=str(tmp_path / "conv"), cls91to80=False)
    finally:
        os.chdir(cwd)
    cat_ids = np.asarray(sorted(c["id"] for c in json.loads(ann.read_text())["categories"]))
    for f, lab, (h, w) in zip(spec.files, spec.labels, shapes):
        txt = tmp_path / "conv" / "labels" / "val2017" / (f.stem + ".txt")
        ref = np.loadtxt(txt, ndmin=2) if txt.is_file() else np.zeros((0, 5))
        ours = lab.astype(np.float64).copy()
        ours[:, 0] = cat_ids[ours[:, 0].astype(int)] - 1
        if f.stem.endswith("0000000"):  # image 0: its last box crosses the edge; upstream does not clip
            x1, y1 = ref[-1, 1] - ref[-1, 3] / 2, ref[-1, 2] - ref[-1, 4] / 2
            ref[-1, 1:] = [(x1 + 1) / 2, (y1 + 1) / 2, 1 - x1, 1 - y1]
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_coco_errors(tmp_path):
    ann, _ = make_coco_dataset(tmp_path / "coco", n=2)
    data = json.loads(ann.read_text())
    for mutate, match in (
        (lambda d: d["annotations"][0].update(category_id=99), r"annotation 1 has category_id 99, not in 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=5), r"annotation 1 refers to unknown image_id 5"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation 1 has bbox \[1, 2, 3\]"),
        (lambda d: d["images"][0].pop("width"), r"image 100 needs 'id', 'file_name', 'width' and 'height'"),
        (lambda d: d.pop("categories"), r"not a COCO detection file"),
    ):
        d = json.loads(json.dumps(data))
        mutate(d)
        ann.write_text(json.dumps(d))
        with pytest.raises(DataError, match=match):
            discover(ann, "val", images=tmp_path / "coco" / "val2017")
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"3 categories but nc=2"):
        discover(ann, "val", images=tmp_path / "coco" / "val2017", nc=2)


# ----------------------------------------------------------------- plain


def test_plain_layout(tmp_path):
    root, expected = make_plain_dataset(tmp_path / "p")
    spec = discover(root, "val")
    assert spec.names == ("c0", "c1", "c2") and list(spec.files) == expected["val"][0]
    for got, want in zip(spec.labels, expected["val"][1]):
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(DataError, match=r"no 'test' split"):
        discover(root, "test")
