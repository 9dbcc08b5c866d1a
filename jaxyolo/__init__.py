"""jaxyolo: YOLO detection losses and label assigners in JAX.

The common path needs nothing deeper than ``import jaxyolo``::

    targets = jaxyolo.Targets.from_rows(rows, batch_size=B, max_boxes=M)
    iou = jaxyolo.bbox_iou(box1, box2, kind="ciou")  # cxcywh by default, as upstream

Modules: ``boxes`` (geometry), ``losses`` (element losses), ``targets``
(the padded ground-truth format), ``assign`` (label assigners),
``objectives`` (the full YOLOv5 / YOLOX / YOLOv8-v9 / end-to-end losses).
"""

from jaxyolo import assign, boxes, losses, objectives
from jaxyolo.boxes import (
    bbox2dist,
    bbox_iou,
    box_iou_matrix,
    dist2bbox,
    make_anchor_points,
    xywh2xyxy,
    xyxy2xywh,
    yolox_bboxes_iou,
)
from jaxyolo.losses import (
    bce_blur_loss,
    bce_with_logits,
    dfl_loss,
    focal_loss,
    qfocal_loss,
    smooth_bce,
    varifocal_loss,
    yolox_iou_loss,
)
from jaxyolo.objectives.e2e import E2ELossConfig, e2e_loss, e2e_o2m_weight
from jaxyolo.objectives.tal import TalLossConfig, yolov8_loss
from jaxyolo.objectives.yolov5 import Yolov5LossConfig, scale_yolov5_hyp, yolov5_loss
from jaxyolo.objectives.yolox import YoloxLossConfig, yolox_loss
from jaxyolo.targets import Targets

__version__ = "0.1.0"

__all__ = [
    "E2ELossConfig",
    "TalLossConfig",
    "Targets",
    "assign",
    "Yolov5LossConfig",
    "YoloxLossConfig",
    "bbox2dist",
    "bbox_iou",
    "bce_blur_loss",
    "bce_with_logits",
    "box_iou_matrix",
    "boxes",
    "dfl_loss",
    "dist2bbox",
    "e2e_loss",
    "e2e_o2m_weight",
    "focal_loss",
    "losses",
    "make_anchor_points",
    "objectives",
    "qfocal_loss",
    "scale_yolov5_hyp",
    "smooth_bce",
    "varifocal_loss",
    "xywh2xyxy",
    "xyxy2xywh",
    "yolox_bboxes_iou",
    "yolox_iou_loss",
    "yolox_loss",
    "yolov8_loss",
    "yolov5_loss",
]


# Detectors, data, evaluation and training (issue 6) load on first use, so
# ``import jaxyolo`` stays light (no flax.nnx / grain / orbax / matplotlib).
_LAZY = {
    "models": "jaxyolo.models",
    "data": "jaxyolo.data",
    "evaluate": "jaxyolo.evaluate",
    "train": "jaxyolo.train",
    "Detector": "jaxyolo.models",
    "build_detector": "jaxyolo.models",
    "decode_yolov5": "jaxyolo.models",
    "decode_yolox": "jaxyolo.models",
    "decode_yolov8": "jaxyolo.models",
    "batched_nms": "jaxyolo.evaluate",
    "end2end_topk": "jaxyolo.evaluate",
    "coco_map": "jaxyolo.evaluate",
    "TrainConfig": "jaxyolo.train",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name])
        return mod if mod.__name__.endswith("." + name) else getattr(mod, name)
    raise AttributeError(f"module 'jaxyolo' has no attribute {name!r}")
