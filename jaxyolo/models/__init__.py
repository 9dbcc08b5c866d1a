"""Flax NNX detectors.

* The upstream architectures, layer for layer: YOLOv8 / YOLO11 (ultralytics),
  YOLOv5 (yolov5), YOLOX (yolox) -- :func:`build_model` by name, PyTorch
  weights in and out with :func:`from_torch` / :func:`to_torch_state_dict`,
  jaxyolo weight directories with :func:`save_weights` / :func:`load_weights`.
* jaxyolo's own small detectors: a YOLOv8-style backbone/neck (pico / nano /
  small) with any of the three heads (:func:`build_detector`).
"""

from jaxyolo._xla import compiler_options
from jaxyolo.models.backbone import MODEL_SIZES, STRIDES, Backbone, ModelSize
from jaxyolo.models.convert import from_torch, load_weights, save_weights, to_torch_state_dict, transfer_weights
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
from jaxyolo.models.registry import MODELS, ModelSpec, build_model, model_loss

__all__ = [
    "HEAD_TYPES",
    "MODELS",
    "MODEL_SIZES",
    "STRIDES",
    "YOLOV5S_ANCHORS",
    "Backbone",
    "Detector",
    "ModelSize",
    "ModelSpec",
    "Yolov5Head",
    "Yolov8Head",
    "YoloxHead",
    "build_detector",
    "build_model",
    "compiler_options",
    "decode_yolov5",
    "decode_yolov8",
    "decode_yolox",
    "from_torch",
    "load_weights",
    "model_loss",
    "save_weights",
    "to_torch_state_dict",
    "transfer_weights",
]
