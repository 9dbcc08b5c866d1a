"""The upstream PyTorch losses, called (never copied) as numerical oracles.

``python -m jaxyolo.testing.oracles --check`` imports every oracle and fails
loudly if one is missing or at the wrong version; ``scripts/test.sh`` runs it
before pytest so that an oracle can never be silently skipped.

Per-family helpers live in ``yolov5.py``, ``yolox.py``, ``ultralytics.py`` and
``yolov9.py`` (the last is our own PyTorch reference: YOLOv9 ships no package).
They take channels-last numpy/JAX inputs and return numpy values and gradients.
"""

from jaxyolo.testing.oracles._torch import (
    ORACLE_VERSIONS,
    grad_nhwc,
    nhwc_to_torch,
    numpy,
    tensor,
    torch,
    ultralytics_modules,
    versions,
    yolov5_modules,
    yolox_modules,
)
from jaxyolo.testing.oracles.ultralytics import make_v8_criterion, v8_detection_loss
from jaxyolo.testing.oracles.yolov5 import yolov5_compute_loss
from jaxyolo.testing.oracles.yolov9 import Yolov9Assigner, yolov9_loss
from jaxyolo.testing.oracles.yolox import yolox_get_assignments, yolox_get_losses

__all__ = [
    "ORACLE_VERSIONS",
    "grad_nhwc",
    "make_v8_criterion",
    "nhwc_to_torch",
    "numpy",
    "tensor",
    "torch",
    "ultralytics_modules",
    "v8_detection_loss",
    "versions",
    "Yolov9Assigner",
    "yolov5_modules",
    "yolov5_compute_loss",
    "yolov9_loss",
    "yolox_get_assignments",
    "yolox_get_losses",
    "yolox_modules",
]
