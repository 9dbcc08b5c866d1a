"""Label assigners: pure, static-shape functions from (predictions, padded
targets) to per-anchor training targets.

* :func:`yolov5_build_targets` -- YOLOv5's anchor-ratio matcher with neighbour cells.
* :func:`simota` -- YOLOX's SimOTA dynamic-k assignment (per image; vmap over B).
* :func:`task_aligned` -- the TaskAlignedAssigner of YOLOv8 (ultralytics) and YOLOv9.
"""

from jaxyolo.assign.yolov5 import Yolov5LevelTargets, yolov5_build_targets  # noqa: E402,F401
from jaxyolo.assign.tal import task_aligned  # noqa: E402,F401
from jaxyolo.assign.simota import SimOTAAssignment, simota  # noqa: E402,F401
