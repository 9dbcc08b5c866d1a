"""In-memory detection datasets, YOLO-format loading, and static-shape batching.

A :class:`DetectionData` holds ``images (N, S, S, 3) uint8`` and per-image
labels ``(n_i, 5) [class, cx, cy, w, h]`` normalised.  :func:`train_batches`
turns it into a grain pipeline of fixed-shape batches: ``images (B, S, S, 3)
uint8`` and a :class:`jaxyolo.Targets` padded to ``max_boxes``.  Every batch
is a pure function of ``(seed, epoch, step)`` (grain ``MapDataset`` random
access), so the data RNG state of a checkpoint is just those three ints and
``--resume`` replays the exact same batches.
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
    "train_batches",
    "eval_batches",
    "collate",
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


# ---------------------------------------------------------------- batching


class _Source:
    """grain random-access source: one padded example per index."""

    def __init__(self, data: DetectionData, max_boxes: int):
        self.data, self.max_boxes = data, max_boxes

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        lab = self.data.labels[i][: self.max_boxes]
        n = len(lab)
        boxes = np.zeros((self.max_boxes, 4), np.float32)
        classes = np.zeros((self.max_boxes,), np.int32)
        mask = np.zeros((self.max_boxes,), bool)
        boxes[:n], classes[:n], mask[:n] = lab[:, 1:], lab[:, 0].astype(np.int32), True
        return {"image": self.data.images[i], "boxes": boxes, "classes": classes, "mask": mask}


def hflip(example, rng: np.random.Generator, p: float = 0.5):
    """Horizontal flip with probability ``p``: image columns reversed, ``cx -> 1 - cx``."""
    if rng.uniform() >= p:
        return example
    out = dict(example)
    out["image"] = example["image"][:, ::-1]
    boxes = example["boxes"].copy()
    boxes[:, 0] = np.where(example["mask"], 1.0 - boxes[:, 0], 0.0)
    out["boxes"] = boxes
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch]).integers(0, 2**31 - 1))


def train_batches(data: DetectionData, *, batch_size: int, max_boxes: int, seed: int, epoch: int, flip: float = 0.5):
    """The training batches of one epoch as a grain ``MapDataset``.

    Shuffled and augmented with seeds derived from ``(seed, epoch)``; the
    last partial batch is dropped (static shapes).  ``ds[step]`` is batch
    ``step`` of the epoch: a dict of ``image (B, S, S, 3) uint8``, ``boxes
    (B, M, 4)``, ``classes (B, M)``, ``mask (B, M)``.  Images with more than
    ``max_boxes`` objects keep the first ``max_boxes``.
    """
    import grain

    if len(data) < batch_size:
        raise ValueError(f"the training set has {len(data)} images, fewer than batch_size={batch_size}")
    es = _epoch_seed(seed, epoch)
    ds = grain.MapDataset.source(_Source(data, max_boxes)).shuffle(seed=es)
    if flip > 0:
        ds = ds.random_map(lambda ex, rng: hflip(ex, rng, flip), seed=es + 1)
    return ds.batch(batch_size, drop_remainder=True)


def iterate(ds, start: int = 0, *, threads: int = 2):
    """Iterate a batched ``MapDataset`` from batch ``start`` with grain's prefetching threads."""
    import grain

    ds = ds[start:]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)))


def eval_batches(data: DetectionData, *, batch_size: int, max_boxes: int):
    """Yield ``(batch, n_valid)`` in order; the last batch is padded with
    empty images to the static batch size (``n_valid`` real images)."""
    src = _Source(data, max_boxes)
    n = len(data)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        exs = [src[i] for i in idx]
        while len(exs) < batch_size:
            pad = dict(exs[0])
            pad["mask"] = np.zeros_like(pad["mask"])
            exs.append(pad)
        yield {k: np.stack([e[k] for e in exs]) for k in exs[0]}, len(idx)


def collate(batch):
    """grain batch dict -> ``(images (B, S, S, 3) uint8, jaxyolo.Targets)`` (numpy leaves)."""
    from jaxyolo.targets import Targets

    return np.asarray(batch["image"]), Targets(
        np.asarray(batch["boxes"], np.float32), np.asarray(batch["classes"], np.int32), np.asarray(batch["mask"], bool)
    )
