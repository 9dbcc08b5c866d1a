"""The three full losses: YOLOv5 ``ComputeLoss``, YOLOX ``get_losses`` and the
YOLOv8/YOLOv9 TAL loss, each with its config dataclass."""
