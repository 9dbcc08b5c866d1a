"""Data: the embedded shapes set, datasets on disk (data.yaml, COCO, plain folders), the input pipeline."""

from jaxyolo.data.dataset import DataError, DetectionData, load_data, load_embedded
from jaxyolo.data.pipeline import Prefetcher, TrainBatches, epoch_permutation, eval_batches, pad_labels
from jaxyolo.data.shapes import SHAPE_CLASSES, make_shapes_dataset, render_shapes_image

__all__ = [
    "SHAPE_CLASSES",
    "DataError",
    "DetectionData",
    "Prefetcher",
    "TrainBatches",
    "epoch_permutation",
    "eval_batches",
    "load_data",
    "load_embedded",
    "make_shapes_dataset",
    "pad_labels",
    "render_shapes_image",
]
