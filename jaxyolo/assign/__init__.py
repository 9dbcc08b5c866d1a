"""Label assigners: pure, static-shape functions from (predictions, padded
targets) to per-anchor training targets.

* :func:`yolov5_build_targets` (``assign/yolov5.py``) -- YOLOv5's anchor-ratio
  matcher with neighbour cells.
* :func:`simota` (``assign/yolox.py``) -- YOLOX's SimOTA dynamic-k assignment
  (per image; vmap over B).
* :func:`task_aligned` (``assign/tal.py``) -- the TaskAlignedAssigner of YOLOv8
  (ultralytics) and YOLOv9.
"""

from jaxyolo.assign.tal import task_aligned
from jaxyolo.assign.yolov5 import Yolov5LevelTargets, yolov5_build_targets
from jaxyolo.assign.yolox import SimOTAAssignment, simota

__all__ = ["SimOTAAssignment", "Yolov5LevelTargets", "simota", "task_aligned", "yolov5_build_targets"]
