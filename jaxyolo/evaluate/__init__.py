"""Evaluation: static-shape batched NMS (JAX) and COCO mAP (pycocotools)."""

from jaxyolo.evaluate.coco import coco_map
from jaxyolo.evaluate.nms import batched_nms, nms_reference

__all__ = ["batched_nms", "coco_map", "nms_reference", "evaluate_model"]


def evaluate_model(*args, **kwargs):
    """See :func:`jaxyolo.train.loop.evaluate_model` (lazy import)."""
    from jaxyolo.train.loop import evaluate_model as f

    return f(*args, **kwargs)
