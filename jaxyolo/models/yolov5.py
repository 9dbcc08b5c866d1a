"""YOLOv5 (v6.0+ layout) as yolov5 7.0.14 defines it.

The table is ``models/yolov5s.yaml`` row for row (the n/s/m/l/x yamls differ
only in ``depth_multiple``/``width_multiple``); ``AnchorDetect`` is yolov5's
anchor ``Detect`` (:class:`jaxyolo.models.heads.Yolov5Head`).  A converted
checkpoint brings its own anchors (AutoAnchor may have changed them).
"""

from __future__ import annotations

from flax import nnx

from jaxyolo.models.graph import GraphModel, parse_table
from jaxyolo.models.heads import YOLOV5S_ANCHORS

__all__ = ["YOLOV5", "SCALES", "build_yolov5"]

YOLOV5 = (
    # backbone
    (-1, 1, "Conv", (64, 6, 2, 2)),  # 0-P1/2
    (-1, 1, "Conv", (128, 3, 2)),  # 1-P2/4
    (-1, 3, "C3", (128,)),
    (-1, 1, "Conv", (256, 3, 2)),  # 3-P3/8
    (-1, 6, "C3", (256,)),
    (-1, 1, "Conv", (512, 3, 2)),  # 5-P4/16
    (-1, 9, "C3", (512,)),
    (-1, 1, "Conv", (1024, 3, 2)),  # 7-P5/32
    (-1, 3, "C3", (1024,)),
    (-1, 1, "SPPF", (1024, 5)),  # 9
    # head
    (-1, 1, "Conv", (512, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),  # cat backbone P4
    (-1, 3, "C3", (512, False)),  # 13
    (-1, 1, "Conv", (256, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 4), 1, "Concat", ()),  # cat backbone P3
    (-1, 3, "C3", (256, False)),  # 17 (P3/8-small)
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 14), 1, "Concat", ()),  # cat head P4
    (-1, 3, "C3", (512, False)),  # 20 (P4/16-medium)
    (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 10), 1, "Concat", ()),  # cat head P5
    (-1, 3, "C3", (1024, False)),  # 23 (P5/32-large)
    ((17, 20, 23), 1, "AnchorDetect", ("anchors",)),  # Detect(P3, P4, P5)
)

#: ``{scale: (depth_multiple, width_multiple)}`` of ``models/yolov5{scale}.yaml``.
SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}


def build_yolov5(scale: str, *, nc: int, anchors=YOLOV5S_ANCHORS, name: str, dtype=None, rngs: nnx.Rngs) -> GraphModel:
    """``models.yolo.Model(f"yolov5{scale}.yaml", nc=nc)`` in NNX (upstream's inits).

    ``anchors``: ``(L, na, 2)`` pixels (default: the yamls' anchors).
    """
    depth, width = SCALES[scale]
    table = YOLOV5[:-1] + (YOLOV5[-1][:3] + ((anchors,),),)
    layers, froms = parse_table(table, nc=nc, depth=depth, width=width, dtype=dtype, rngs=rngs)
    return GraphModel(layers, froms, name=name, family="yolov5", dtype=dtype)
