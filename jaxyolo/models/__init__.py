"""Flax NNX detectors: a YOLOv8-style backbone/neck and the three heads."""

from jaxyolo.models.backbone import MODEL_SIZES, STRIDES, Backbone, ModelSize
from jaxyolo.models.detector import HEAD_TYPES, Detector, build_detector
from jaxyolo.models.heads import (
    YOLOV5S_ANCHORS,
    Yolov5Head,
    Yolov8Head,
    YoloxHead,
    decode_yolov5,
    decode_yolov8,
    decode_yolox,
)

__all__ = [
    "HEAD_TYPES",
    "MODEL_SIZES",
    "STRIDES",
    "YOLOV5S_ANCHORS",
    "Backbone",
    "Detector",
    "ModelSize",
    "Yolov5Head",
    "Yolov8Head",
    "YoloxHead",
    "build_detector",
    "decode_yolov5",
    "decode_yolov8",
    "decode_yolox",
]
