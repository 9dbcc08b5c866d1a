"""Data: the embedded shapes set, datasets on disk (data.yaml, COCO, plain folders; decoded up front or streamed), the input pipeline."""

from jaxyolo.data.dataset import DataError, DetectionData, load_data, load_embedded
from jaxyolo.data.pipeline import Prefetcher, TrainBatches, epoch_permutation, eval_batches, pad_labels
from jaxyolo.data.shapes import SHAPE_CLASSES, make_shapes_dataset, render_shapes_image
from jaxyolo.data.stream import DecodePool, StreamedData, open_split

__all__ = [
    "SHAPE_CLASSES",
    "StreamedData",
    "DataError",
    "DecodePool",
    "DetectionData",
    "Prefetcher",
    "TrainBatches",
    "epoch_permutation",
    "eval_batches",
    "load_data",
    "load_embedded",
    "make_shapes_dataset",
    "open_split",
    "pad_labels",
    "render_shapes_image",
]
