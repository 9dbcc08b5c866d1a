"""Data: the embedded shapes dataset, YOLO-format directories, grain batching."""

from jaxyolo.data.dataset import (
    DataError,
    DetectionData,
    collate,
    eval_batches,
    hflip,
    iterate,
    load_data,
    load_embedded,
    load_yolo_dir,
    train_batches,
)
from jaxyolo.data.shapes import SHAPE_CLASSES, make_shapes_dataset, render_shapes_image

__all__ = [
    "SHAPE_CLASSES",
    "DataError",
    "DetectionData",
    "collate",
    "eval_batches",
    "hflip",
    "iterate",
    "load_data",
    "load_embedded",
    "load_yolo_dir",
    "make_shapes_dataset",
    "render_shapes_image",
    "train_batches",
]
