"""Evaluation: static-shape batched NMS (JAX), COCO mAP (pycocotools), mAP of a model over a dataset."""

from jaxyolo.evaluate.coco import coco_map
from jaxyolo.evaluate.model import evaluate_model
from jaxyolo.evaluate.nms import batched_nms, nms_reference

__all__ = ["batched_nms", "coco_map", "evaluate_model", "nms_reference"]
