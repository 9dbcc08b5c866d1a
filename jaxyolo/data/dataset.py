"""In-memory detection datasets and YOLO-format loading.

A :class:`DetectionData` holds ``images (N, S, S, 3) uint8`` and per-image
labels ``(n_i, 5) [class, cx, cy, w, h]`` normalised; batching lives in
:mod:`jaxyolo.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxyolo.data.formats import DataError, discover_plain

__all__ = [
    "DetectionData",
    "DataError",
    "load_embedded",
    "load_yolo_dir",
    "load_data",
    "EMBEDDED_TRAIN_SIZE",
    "EMBEDDED_VAL_SIZE",
]

EMBEDDED_TRAIN_SIZE = 3000
EMBEDDED_VAL_SIZE = 400


@dataclasses.dataclass(frozen=True)
class DetectionData:
    """``images (N, S, S, 3) uint8``; ``labels`` N arrays ``(n_i, 5)`` float32
    ``[class, cx, cy, w, h]`` normalised; ``names`` the nc class names."""

    images: np.ndarray
    labels: tuple
    names: tuple
    # Optional, from jaxyolo.data.images (letterboxed files); None = the images fill the S x S frame.
    content: np.ndarray | None = None  # (N, 4) int32 [top, left, h, w]: the un-padded area of each image
    orig_shapes: np.ndarray | None = None  # (N, 2) int32 [h, w] of the original files
    files: tuple | None = None  # N source paths

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def content_rects(self) -> np.ndarray:
        """``(N, 4)`` int32 ``[top, left, h, w]``: ``content``, or the full frame."""
        if self.content is not None:
            return self.content
        n, s = len(self), self.img_size
        return np.tile(np.asarray([[0, 0, s, s]], np.int32), (n, 1))

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


def _load_image(path: Path, img_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((img_size, img_size), Image.BILINEAR)
            return np.asarray(im, np.uint8)
    except Exception as e:  # PIL raises several types for corrupt files
        raise DataError(f"cannot decode image {path}: {e}") from e


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
    spec = discover_plain(root, split, nc=nc)
    images = np.stack([_load_image(f, img_size) for f in spec.files])
    return DetectionData(images, spec.labels, spec.names)


def load_data(spec: str, split: str, *, img_size: int = 128, nc: int | None = None, embedded_size: int | None = None) -> DetectionData:
    """``spec`` is ``"embedded"`` or a YOLO dataset directory."""
    if spec == "embedded":
        return load_embedded(split, img_size=img_size, size=embedded_size)
    return load_yolo_dir(spec, split, img_size=img_size, nc=nc)
