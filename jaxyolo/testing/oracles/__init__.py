"""The upstream PyTorch losses, called (never copied) as numerical oracles.

``python -m jaxyolo.testing.oracles --check`` imports every oracle and fails
loudly if one is missing or at the wrong version; ``scripts/test.sh`` runs it
before pytest so that an oracle can never be silently skipped.

Per-family helpers live in ``yolov5.py``, ``yolox.py``, ``ultralytics.py`` and
``yolov9.py`` (YOLOv9's own code, packaged on PyPI as ``yolo9``).  They take
channels-last numpy/JAX inputs and return numpy values and gradients.
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
    yolov9_modules,
    yolox_modules,
)
from jaxyolo.testing.oracles.ultralytics import make_v8_criterion, ultralytics_nms, ultralytics_val_metrics, v8_detection_loss
from jaxyolo.testing.oracles.ultralytics_e2e import e2e_detection_loss, e2e_o2m_schedule, float32_newton_schulz, make_e2e_model, musgd_steps
from jaxyolo.testing.oracles.yolov5 import yolov5_compute_loss
from jaxyolo.testing.oracles.yolov9 import make_yolov9_criterion, yolov9_assign, yolov9_loss
from jaxyolo.testing.oracles.yolox import yolox_get_assignments, yolox_get_losses

__all__ = [
    "ORACLE_VERSIONS",
    "e2e_detection_loss",
    "e2e_o2m_schedule",
    "float32_newton_schulz",
    "grad_nhwc",
    "make_e2e_model",
    "make_v8_criterion",
    "musgd_steps",
    "make_yolov9_criterion",
    "nhwc_to_torch",
    "numpy",
    "tensor",
    "torch",
    "ultralytics_modules",
    "ultralytics_nms",
    "ultralytics_val_metrics",
    "v8_detection_loss",
    "versions",
    "yolov5_modules",
    "yolov5_compute_loss",
    "yolov9_assign",
    "yolov9_loss",
    "yolov9_modules",
    "yolox_get_assignments",
    "yolox_get_losses",
    "yolox_modules",
]
