"""The three full losses: YOLOv5 ``ComputeLoss``, YOLOX ``get_losses`` and the
YOLOv8/YOLOv9 TAL loss, each with its config dataclass."""

from jaxyolo.objectives.yolov5 import Yolov5LossConfig, scale_yolov5_hyp, yolov5_loss  # noqa: E402,F401
from jaxyolo.objectives.tal import TalLossConfig, yolov8_loss  # noqa: E402,F401
from jaxyolo.objectives.yolox import YoloxLossConfig, yolox_loss  # noqa: E402,F401
