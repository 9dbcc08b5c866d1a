"""In-memory detection datasets and YOLO-format loading.

A :class:`DetectionData` holds ``images (N, S, S, 3) uint8`` and per-image
labels ``(n_i, 5) [class, cx, cy, w, h]`` normalised; batching lives in
:mod:`jaxyolo.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

__all__ = [
    "DetectionData",
    "DataError",
    "load_embedded",
    "load_yolo_dir",
    "load_data",
    "EMBEDDED_TRAIN_SIZE",
    "EMBEDDED_VAL_SIZE",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EMBEDDED_TRAIN_SIZE = 3000
EMBEDDED_VAL_SIZE = 400


class DataError(ValueError):
    """A dataset problem, with the offending file in the message."""


@dataclasses.dataclass(frozen=True)
class DetectionData:
    """``images (N, S, S, 3) uint8``; ``labels`` N arrays ``(n_i, 5)`` float32
    ``[class, cx, cy, w, h]`` normalised; ``names`` the nc class names."""

    images: np.ndarray
    labels: tuple
    names: tuple

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def img_size(self) -> int:
        return self.images.shape[1]

    def __len__(self):
        return self.images.shape[0]

    def max_objects(self) -> int:
        return max((len(lab) for lab in self.labels), default=0)


def load_embedded(split: str, *, img_size: int = 128, size: int | None = None) -> DetectionData:
    """The embedded shapes dataset (:mod:`jaxyolo.data.shapes`); ``split`` in
    ``{"train", "val"}`` (different seeds, so no overlap)."""
    from jaxyolo.data.shapes import SHAPE_CLASSES, make_shapes_dataset

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    n = size if size is not None else (EMBEDDED_TRAIN_SIZE if split == "train" else EMBEDDED_VAL_SIZE)
    images, labels = make_shapes_dataset(n, seed=1 if split == "train" else 2, img_size=img_size)
    return DetectionData(images, tuple(labels), SHAPE_CLASSES)


# ------------------------------------------------------------ YOLO format


def _read_labels(path: Path, nc: int | None) -> np.ndarray:
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read label file {path}: {e}") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise DataError(f"{path}:{lineno}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}")
        try:
            vals = [float(f) for f in fields]
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: non-numeric field in {line.strip()!r}") from e
        c = vals[0]
        if c != int(c) or c < 0:
            raise DataError(f"{path}:{lineno}: class id must be a non-negative integer, got {fields[0]!r}")
        if nc is not None and c >= nc:
            raise DataError(f"{path}:{lineno}: class id {int(c)} >= nc={nc}")
        box = np.asarray(vals[1:])
        if not np.all(np.isfinite(box)) or np.any(box < -0.01) or np.any(box > 1.01):
            raise DataError(f"{path}:{lineno}: box {fields[1:]} is not normalised cx cy w h in [0, 1]")
        rows.append(vals)
    lab = np.asarray(rows, np.float32).reshape(-1, 5)
    lab[:, 1:] = np.clip(lab[:, 1:], 0.0, 1.0)
    return lab


def _load_image(path: Path, img_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((img_size, img_size), Image.BILINEAR)
            return np.asarray(im, np.uint8)
    except Exception as e:  # PIL raises several types for corrupt files
        raise DataError(f"cannot decode image {path}: {e}") from e


def _split_dirs(root: Path, split: str):
    """``(images_dir, labels_dir)`` for ``split``: ``root/images/<split>`` if it
    exists (the ultralytics layout), else ``root/images`` for both splits."""
    if (root / "images" / split).is_dir():
        images = root / "images" / split
    elif (root / "images").is_dir() and not any(p.is_dir() for p in (root / "images").iterdir()):
        images = root / "images"
    elif (root / "images").is_dir():
        raise DataError(f"dataset {root}: no '{split}' split (expected {root / 'images' / split})")
    else:
        images = None
    if images is not None:
        return images, root / "labels" / images.relative_to(root / "images")
    raise DataError(f"dataset {root}: no images directory (expected {root / 'images' / split} or {root / 'images'})")


def load_yolo_dir(root, split: str = "train", *, img_size: int = 128, nc: int | None = None) -> DetectionData:
    """Load a YOLO-format dataset directory.

    Layout: ``root/images/<split>/*.jpg`` with ``root/labels/<split>/*.txt``
    (or ``root/images`` + ``root/labels`` for both splits); one line per box,
    ``class cx cy w h`` normalised.  An image without a label file has no
    objects.  Class names come from ``root/classes.txt`` (one per line) if it
    exists, otherwise ``nc`` (or the largest id + 1) numbered classes.
    Images are resized (stretched) to ``img_size`` x ``img_size``.

    Raises:
      DataError naming the path/file for: a missing root, no images, no
      label files at all, a line without 5 fields, a class id >= nc, a box
      outside [0, 1], an image that fails to decode.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a directory")
    names = None
    if (root / "classes.txt").is_file():
        names = tuple(n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip())
        if nc is not None and nc != len(names):
            raise DataError(f"{root / 'classes.txt'} lists {len(names)} classes but nc={nc}")
        nc = len(names)
    images_dir, labels_dir = _split_dirs(root, split)
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"dataset {root}: no images ({', '.join(IMAGE_EXTS)}) in {images_dir}")
    if not labels_dir.is_dir() or not any(labels_dir.glob("*.txt")):
        raise DataError(f"dataset {root}: no label files (*.txt) in {labels_dir}")
    labels = []
    for f in files:
        lf = labels_dir / (f.stem + ".txt")
        labels.append(_read_labels(lf, nc) if lf.is_file() else np.zeros((0, 5), np.float32))
    images = np.stack([_load_image(f, img_size) for f in files])
    if names is None:
        top = max((int(lab[:, 0].max()) + 1 for lab in labels if len(lab)), default=1)
        names = tuple(str(i) for i in range(nc if nc is not None else top))
    return DetectionData(images, tuple(labels), names)


def load_data(spec: str, split: str, *, img_size: int = 128, nc: int | None = None, embedded_size: int | None = None) -> DetectionData:
    """``spec`` is ``"embedded"`` or a YOLO dataset directory."""
    if spec == "embedded":
        return load_embedded(split, img_size=img_size, size=embedded_size)
    return load_yolo_dir(spec, split, img_size=img_size, nc=nc)
