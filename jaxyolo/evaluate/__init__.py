"""Evaluation: static-shape batched NMS (JAX), ``yolo val``'s mAP and COCO mAP (pycocotools), mAP of a model over a dataset."""

from jaxyolo.evaluate.coco import coco_map
from jaxyolo.evaluate.model import EVAL_PRE_NMS_TOPK, eval_max_det, evaluate_model
from jaxyolo.evaluate.nms import batched_nms, end2end_topk, nms_reference, select_detections
from jaxyolo.evaluate.yolo_val import format_val_table, yolo_val_metrics

__all__ = ["EVAL_PRE_NMS_TOPK", "batched_nms", "coco_map", "end2end_topk", "eval_max_det", "evaluate_model", "format_val_table", "nms_reference", "select_detections", "yolo_val_metrics"]
