"""Small datasets built on the fly in the three layouts users bring.

Each image is a smooth gradient with filled rectangles at its labelled boxes
(so pixels can be checked and a detector can learn them), in mixed sizes and
formats (JPEG, PNG, BMP, WebP, grayscale), plus a background image without a
label file.  The builders return what discovery must find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = ((230, 40, 40), (40, 200, 60), (40, 70, 230), (240, 220, 30))


def write_image(path: Path, h: int, w: int, labels=(), *, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """Write an ``h x w`` image with class-coloured filled boxes at ``labels``
    (rows ``[class, cx, cy, w, h]`` normalised); returns the RGB pixels
    written (before any lossy compression)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w].astype(np.float32)
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    t = (x / max(w - 1, 1) + y / max(h - 1, 1))[..., None] / 2
    img = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    for c, cx, cy, bw, bh in np.asarray(labels, np.float64).reshape(-1, 5):
        x1, x2 = int(round((cx - bw / 2) * w)), int(round((cx + bw / 2) * w))
        y1, y2 = int(round((cy - bh / 2) * h)), int(round((cy + bh / 2) * h))
        img[y1:y2, x1:x2] = COLORS[int(c) % len(COLORS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img)
    if mode != "RGB":
        im = im.convert(mode)
    kw = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    if path.suffix.lower() == ".webp":
        kw = {"lossless": True}
    im.save(path, **kw)
    return np.asarray(im.convert("RGB"))


def _labels(rng, n, nc):
    rows = []
    for _ in range(n):
        bw, bh = rng.uniform(0.15, 0.4, 2)
        cx, cy = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
        rows.append([int(rng.integers(nc)), cx, cy, bw, bh])
    return np.round(np.asarray(rows, np.float64).reshape(-1, 5), 4)


# (h, w, suffix, mode) cycled over the images of a split: mixed sizes and formats.
_KINDS = ((480, 640, ".jpg", "RGB"), (500, 300, ".png", "RGB"), (120, 200, ".png", "L"), (333, 333, ".bmp", "RGB"), (240, 180, ".webp", "RGB"))


def _write_yolo_split(images_dir: Path, labels_dir: Path, n: int, nc: int, seed: int, *, background: bool = True):
    """n labelled images (+ one background image without a label file)."""
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for i in range(n):
        h, w, suffix, mode = _KINDS[i % len(_KINDS)]
        lab = _labels(rng, 1 + i % 3, nc)
        f = images_dir / f"im{i:03d}{suffix}"
        write_image(f, h, w, lab, mode=mode, seed=seed * 1000 + i)
        labels_dir.mkdir(parents=True, exist_ok=True)
        (labels_dir / f"im{i:03d}.txt").write_text("".join(f"{int(r[0])} {r[1]:g} {r[2]:g} {r[3]:g} {r[4]:g}\n" for r in lab))
        files.append(f)
        labels.append(lab.astype(np.float32))
    if background:
        f = images_dir / "zz_background.jpg"
        write_image(f, 200, 260, seed=seed * 1000 + 999)
        files.append(f)
        labels.append(np.zeros((0, 5), np.float32))
    return files, labels


def make_yaml_dataset(root: Path, *, n_train: int = 6, n_val: int = 3, names=("cat", "dog", "bird")):
    """Ultralytics layout: ``root/data.yaml`` with ``names`` as a dict,
    ``train`` a directory and ``val`` an image-list ``.txt`` of ``./`` lines.
    Returns ``(yaml_path, {split: (files, labels)})``, sorted as discovery sorts."""
    root = Path(root)
    out = {}
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        files, labels = _write_yolo_split(root / "images" / split, root / "labels" / split, n, len(names), seed)
        order = np.argsort([str(f) for f in files], kind="stable")
        out[split] = ([files[i] for i in order], [labels[i] for i in order])
    (root / "val.txt").write_text("".join(f"./{f.relative_to(root).as_posix()}\n" for f in out["val"][0]))
    names_yaml = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: {root}\ntrain: images/train\nval: val.txt\nnames:\n{names_yaml}\n")
    return yaml_path, out


def make_plain_dataset(root: Path, *, n_train: int = 6, n_val: int = 3, nc: int = 3):
    """``root/images/{train,val}`` + ``root/labels/{train,val}`` + ``classes.txt``."""
    root = Path(root)
    out = {}
    for split, n, seed in (("train", n_train, 3), ("val", n_val, 4)):
        out[split] = _write_yolo_split(root / "images" / split, root / "labels" / split, n, nc, seed)
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(nc)))
    return root, out


COCO_CATEGORIES = ({"id": 12, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"})  # non-contiguous, unsorted


def make_coco_dataset(root: Path, *, n: int = 5, split: str = "val2017", seed: int = 5):
    """COCO layout: ``root/annotations/instances_<split>.json`` + ``root/<split>/``.

    Image 0 carries the edge cases: a crowd box (ignored), a zero-width box
    (dropped), a box crossing the right/bottom edge (clipped).  The last image
    has no annotation (background).  Returns ``(json_path, expected)`` with
    ``expected = (files, labels (n_i, 5) normalised, names)``; names in sorted
    category-id order (car, train, kite).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    cat_ids = sorted(c["id"] for c in COCO_CATEGORIES)
    names = tuple(next(c["name"] for c in COCO_CATEGORIES if c["id"] == i) for i in cat_ids)
    images, anns, files, labels = [], [], [], []
    for i in range(n):
        h, w = (240, 320) if i % 2 == 0 else (300, 200)
        lab = _labels(rng, 0 if i == n - 1 else 1 + i % 2, len(cat_ids))
        f = root / split / f"{i:012d}.jpg"
        write_image(f, h, w, lab, seed=seed * 100 + i)
        images.append({"id": 100 + i, "file_name": f.name, "height": h, "width": w})
        for c, cx, cy, bw, bh in lab:
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat_ids[int(c)], "iscrowd": 0,
                         "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], "area": bw * w * bh * h})
        files.append(f)
        labels.append(lab.astype(np.float32))
    h, w = images[0]["height"], images[0]["width"]
    anns.append({"id": 900, "image_id": 100, "category_id": 3, "iscrowd": 1, "bbox": [5, 5, 50, 50], "area": 2500})
    anns.append({"id": 901, "image_id": 100, "category_id": 7, "iscrowd": 0, "bbox": [30, 30, 0, 40], "area": 0})
    anns.append({"id": 902, "image_id": 100, "category_id": 12, "iscrowd": 0, "bbox": [w - 40, h - 30, 80, 60], "area": 4800})
    labels[0] = np.concatenate([labels[0], np.asarray([[2, (w - 20) / w, (h - 15) / h, 40 / w, 30 / h]], np.float32)])
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": list(COCO_CATEGORIES)}))
    return ann_file, (files, labels, names)
