"""``Detector(backbone, head)``: a backbone+neck and one of the three heads."""

from __future__ import annotations

from flax import nnx

from jaxyolo.models.backbone import STRIDES, Backbone
from jaxyolo.models.heads import (
    YOLOV5S_ANCHORS,
    Yolov5Head,
    Yolov8Head,
    YoloxHead,
    decode_yolov5,
    decode_yolov8,
    decode_yolox,
)

__all__ = ["HEAD_TYPES", "Detector", "build_detector"]

HEAD_TYPES = ("yolov5", "yolox", "yolov8")
_HEADS = {"yolov5": Yolov5Head, "yolox": YoloxHead, "yolov8": Yolov8Head}


class Detector(nnx.Module):
    """A detector: ``images (B, S_h, S_w, 3)`` float in [0, 1] -> per-level raw
    predictions in the layout of ``head_type``'s loss (see
    :mod:`jaxyolo.models.heads`).  ``decode(preds)`` gives ``(B, A, 4)`` xyxy
    pixel boxes and ``(B, A, nc)`` scores.
    """

    def __init__(self, backbone: Backbone, head):
        head_type = next((k for k, v in _HEADS.items() if isinstance(head, v)), None)
        if head_type is None:
            raise TypeError(f"head must be a Yolov5Head, YoloxHead or Yolov8Head, got {type(head).__name__}")
        if tuple(head.in_channels) != tuple(backbone.out_channels):
            raise ValueError(f"head expects channels {head.in_channels} but the backbone gives {backbone.out_channels}")
        self.backbone = backbone
        self.head = head
        self.head_type = head_type
        self.strides = tuple(backbone.strides)
        self.nc = head.nc

    def __call__(self, images):
        return self.head(self.backbone(images))

    def decode(self, preds):
        """Raw per-level predictions -> ``(B, A, 4)`` xyxy px, ``(B, A, nc)`` scores."""
        if self.head_type == "yolov5":
            return decode_yolov5(preds, anchors=self.head.anchor_array, strides=self.strides)
        if self.head_type == "yolox":
            return decode_yolox(preds, strides=self.strides)
        return decode_yolov8(preds, strides=self.strides, reg_max=self.head.reg_max)


def build_detector(head_type: str = "yolov8", *, nc: int, size="pico", reg_max: int = 16, anchors=YOLOV5S_ANCHORS, seed: int = 0) -> Detector:
    """Build ``Detector(Backbone(size), <head_type> head)`` with upstream bias inits.

    Args:
      head_type: ``"yolov5" | "yolox" | "yolov8"``.
      nc: number of classes.
      size: ``"pico" | "nano" | "small"`` or a :class:`ModelSize`.
      reg_max: DFL bins (YOLOv8 head only).
      anchors: ``(L, na, 2)`` pixel anchors (YOLOv5 head only).
      seed: parameter-init seed.
    """
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    if not isinstance(nc, int) or nc < 1:
        raise ValueError(f"nc must be a positive int, got {nc!r}")

    return _build(head_type, nc=nc, size=size, reg_max=reg_max, anchors=anchors, seed=seed)


def _build(head_type, *, nc, size, reg_max, anchors, seed):
    rngs = nnx.Rngs(seed)
    backbone = Backbone(size, rngs=rngs)
    ch = backbone.out_channels
    if head_type == "yolov5":
        head = Yolov5Head(ch, nc, anchors=anchors, strides=STRIDES, rngs=rngs)
    elif head_type == "yolox":
        head = YoloxHead(ch, nc, rngs=rngs)
    else:
        head = Yolov8Head(ch, nc, reg_max=reg_max, strides=STRIDES, rngs=rngs)
    return Detector(backbone, head)
