"""YOLOv8 and YOLO11 as ultralytics 8.4.190 defines them.

The tables are ``cfg/models/v8/yolov8.yaml`` and ``cfg/models/11/yolo11.yaml``
row for row (``[from, repeats, module, args]``); the scales are theirs
``(depth, width, max_channels)``.  YOLOv8 has the legacy ``Detect`` class
branch (3x3 convs), YOLO11 the current one (depthwise 3x3 + 1x1 pairs),
chosen by the presence of C3k2 as upstream does.
"""

from __future__ import annotations

from flax import nnx

from jaxyolo.models.graph import GraphModel, parse_table

__all__ = ["YOLOV8", "YOLO11", "SCALES", "build_ultralytics"]

YOLOV8 = (
    # backbone
    (-1, 1, "Conv", (64, 3, 2)),  # 0-P1/2
    (-1, 1, "Conv", (128, 3, 2)),  # 1-P2/4
    (-1, 3, "C2f", (128, True)),
    (-1, 1, "Conv", (256, 3, 2)),  # 3-P3/8
    (-1, 6, "C2f", (256, True)),
    (-1, 1, "Conv", (512, 3, 2)),  # 5-P4/16
    (-1, 6, "C2f", (512, True)),
    (-1, 1, "Conv", (1024, 3, 2)),  # 7-P5/32
    (-1, 3, "C2f", (1024, True)),
    (-1, 1, "SPPF", (1024, 5)),  # 9
    # head
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),  # cat backbone P4
    (-1, 3, "C2f", (512,)),  # 12
    (-1, 1, "Upsample", ()),
    ((-1, 4), 1, "Concat", ()),  # cat backbone P3
    (-1, 3, "C2f", (256,)),  # 15 (P3/8-small)
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 12), 1, "Concat", ()),  # cat head P4
    (-1, 3, "C2f", (512,)),  # 18 (P4/16-medium)
    (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 9), 1, "Concat", ()),  # cat head P5
    (-1, 3, "C2f", (1024,)),  # 21 (P5/32-large)
    ((15, 18, 21), 1, "Detect", ()),  # Detect(P3, P4, P5)
)

YOLO11 = (
    # backbone
    (-1, 1, "Conv", (64, 3, 2)),  # 0-P1/2
    (-1, 1, "Conv", (128, 3, 2)),  # 1-P2/4
    (-1, 2, "C3k2", (256, False, 0.25)),
    (-1, 1, "Conv", (256, 3, 2)),  # 3-P3/8
    (-1, 2, "C3k2", (512, False, 0.25)),
    (-1, 1, "Conv", (512, 3, 2)),  # 5-P4/16
    (-1, 2, "C3k2", (512, True)),
    (-1, 1, "Conv", (1024, 3, 2)),  # 7-P5/32
    (-1, 2, "C3k2", (1024, True)),
    (-1, 1, "SPPF", (1024, 5)),  # 9
    (-1, 2, "C2PSA", (1024,)),  # 10
    # head
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),  # cat backbone P4
    (-1, 2, "C3k2", (512, False)),  # 13
    (-1, 1, "Upsample", ()),
    ((-1, 4), 1, "Concat", ()),  # cat backbone P3
    (-1, 2, "C3k2", (256, False)),  # 16 (P3/8-small)
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 13), 1, "Concat", ()),  # cat head P4
    (-1, 2, "C3k2", (512, False)),  # 19 (P4/16-medium)
    (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 10), 1, "Concat", ()),  # cat head P5
    (-1, 2, "C3k2", (1024, True)),  # 22 (P5/32-large)
    ((16, 19, 22), 1, "Detect", ()),  # Detect(P3, P4, P5)
)

#: ``{arch: (table, {scale: (depth, width, max_channels)})}`` as in the yamls.
SCALES = {
    "yolov8": (YOLOV8, {
        "n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
        "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512),
    }),
    "yolo11": (YOLO11, {
        "n": (0.50, 0.25, 1024), "s": (0.50, 0.50, 1024), "m": (0.50, 1.00, 512),
        "l": (1.00, 1.00, 512), "x": (1.00, 1.50, 512),
    }),
}


def build_ultralytics(arch: str, scale: str, *, nc: int, reg_max: int = 16, name: str, dtype=None,
                      rngs: nnx.Rngs) -> GraphModel:
    """``DetectionModel(f"{arch}{scale}.yaml", nc=nc)`` in NNX (upstream's inits)."""
    table, scales = SCALES[arch]
    depth, width, max_channels = scales[scale]
    layers, froms = parse_table(table, nc=nc, depth=depth, width=width, max_channels=max_channels, scale=scale,
                                reg_max=reg_max, dtype=dtype, rngs=rngs)
    return GraphModel(layers, froms, name=name, family="ultralytics", dtype=dtype)
