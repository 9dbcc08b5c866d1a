"""The full losses: YOLOv5 ``ComputeLoss``, YOLOX ``get_losses``, the
YOLOv8/YOLOv9 TAL loss and the end-to-end (YOLOv10 / YOLO26) loss, each with
its config dataclass."""

from jaxyolo.objectives.e2e import E2ELossConfig, e2e_loss, e2e_o2m_weight
from jaxyolo.objectives.tal import TalLossConfig, yolov8_loss
from jaxyolo.objectives.yolov5 import Yolov5LossConfig, scale_yolov5_hyp, yolov5_loss
from jaxyolo.objectives.yolox import YoloxLossConfig, yolox_loss

__all__ = [
    "E2ELossConfig",
    "TalLossConfig",
    "Yolov5LossConfig",
    "YoloxLossConfig",
    "e2e_loss",
    "e2e_o2m_weight",
    "scale_yolov5_hyp",
    "yolov5_loss",
    "yolov8_loss",
    "yolox_loss",
]
