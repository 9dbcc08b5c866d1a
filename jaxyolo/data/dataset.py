"""Detection datasets in memory: the embedded shapes set and datasets on disk.

A :class:`DetectionData` holds ``images (N, S, S, 3) uint8`` and per-image
labels ``(n_i, 5) [class, cx, cy, w, h]`` normalised; batching lives in
:mod:`jaxyolo.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxyolo.data.formats import DataError

__all__ = [
    "DetectionData",
    "DataError",
    "load_embedded",
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


def load_data(
    spec: str, split: str, *, img_size: int = 128, nc: int | None = None, embedded_size: int | None = None,
    images=None, cache=None, warn=None,
) -> DetectionData:
    """One split of a dataset, decoded and letterboxed to ``img_size``.

    Args:
      spec: ``"embedded"`` (the shapes set, ``embedded_size`` images), an
        Ultralytics ``data.yaml``, a COCO folder or ``.json`` (with
        ``images``), or a plain ``images/`` + ``labels/`` folder
        (:func:`jaxyolo.data.formats.discover`).
      split: ``"train"`` or ``"val"``.
      nc: checked against the dataset's class names when given.
      cache: a folder for the memory-mapped decoded images
        (``<split>-<S>.npy``; :func:`jaxyolo.data.images.load_split`), or None (RAM).
      warn: ``callable(str)`` for the skipped-images line.
    """
    if spec == "embedded":
        data = load_embedded(split, img_size=img_size, size=embedded_size)
        if nc is not None and nc != data.nc:
            raise DataError(f"the embedded dataset has {data.nc} classes {data.names}, but nc={nc}")
        return data
    from jaxyolo.data.images import load_dataset

    path = None if cache is None else Path(cache) / f"{split}-{img_size}.npy"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return load_dataset(spec, split, img_size=img_size, images=images, nc=nc, cache=path, warn=warn)
