"""The three full losses: YOLOv5 ``ComputeLoss``, YOLOX ``get_losses`` and the
YOLOv8/YOLOv9 TAL loss, each with its config dataclass."""

from jaxyolo.objectives.tal import TalLossConfig, yolov8_loss
from jaxyolo.objectives.yolov5 import Yolov5LossConfig, scale_yolov5_hyp, yolov5_loss
from jaxyolo.objectives.yolox import YoloxLossConfig, yolox_loss

__all__ = [
    "TalLossConfig",
    "Yolov5LossConfig",
    "YoloxLossConfig",
    "scale_yolov5_hyp",
    "yolov5_loss",
    "yolov8_loss",
    "yolox_loss",
]
