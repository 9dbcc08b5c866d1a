"""YOLOv8, YOLO11, YOLO26 and YOLOv10 as ultralytics 8.4.190 defines them.

The tables are ``cfg/models/v8/yolov8.yaml``, ``cfg/models/11/yolo11.yaml``,
``cfg/models/26/yolo26.yaml`` and ``cfg/models/v10/yolov10{n,s,m,b,l,x}.yaml``
row for row (``[from, repeats, module, args]``); the scales are theirs
``(depth, width, max_channels)``.  YOLOv8 has the legacy ``Detect`` class
branch (3x3 convs), the others the current one (depthwise 3x3 + 1x1 pairs),
chosen by the presence of C3k2 / C2fCIB as upstream does.  YOLO26 (yaml
``end2end: True, reg_max: 1``) and YOLOv10 (``v10Detect``) have end-to-end
heads: a one-to-one branch next to the usual one, decoded without NMS.
"""

from __future__ import annotations

from flax import nnx

from jaxyolo.models.graph import GraphModel, parse_table

__all__ = ["YOLOV8", "YOLO11", "YOLO26", "YOLOV10", "SCALES", "build_ultralytics"]

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

# yolo26.yaml is yolo11.yaml but for these rows: SPPF [c2, k, n, shortcut]
# (shortcut, unactivated cv1), the neck's C3k2 with c3k=True, and the last
# one with attention.
YOLO26 = tuple({
    9: (-1, 1, "SPPF", (1024, 5, 3, True)),
    13: (-1, 2, "C3k2", (512, True)),
    16: (-1, 2, "C3k2", (256, True)),  # 16 (P3/8-small)
    19: (-1, 2, "C3k2", (512, True)),  # 19 (P4/16-medium)
    22: (-1, 1, "C3k2", (1024, True, 0.5, True)),  # 22 (P5/32-large)
}.get(i, row) for i, row in enumerate(YOLO11))

YOLOV10 = (  # yolov10n.yaml; the other scales replace rows (_V10_ROWS)
    # backbone
    (-1, 1, "Conv", (64, 3, 2)),  # 0-P1/2
    (-1, 1, "Conv", (128, 3, 2)),  # 1-P2/4
    (-1, 3, "C2f", (128, True)),
    (-1, 1, "Conv", (256, 3, 2)),  # 3-P3/8
    (-1, 6, "C2f", (256, True)),
    (-1, 1, "SCDown", (512, 3, 2)),  # 5-P4/16
    (-1, 6, "C2f", (512, True)),
    (-1, 1, "SCDown", (1024, 3, 2)),  # 7-P5/32
    (-1, 3, "C2f", (1024, True)),
    (-1, 1, "SPPF", (1024, 5)),  # 9
    (-1, 1, "PSA", (1024,)),  # 10
    # head
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),  # cat backbone P4
    (-1, 3, "C2f", (512,)),  # 13
    (-1, 1, "Upsample", ()),
    ((-1, 4), 1, "Concat", ()),  # cat backbone P3
    (-1, 3, "C2f", (256,)),  # 16 (P3/8-small)
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 13), 1, "Concat", ()),  # cat head P4
    (-1, 3, "C2f", (512,)),  # 19 (P4/16-medium)
    (-1, 1, "SCDown", (512, 3, 2)),
    ((-1, 10), 1, "Concat", ()),  # cat head P5
    (-1, 3, "C2fCIB", (1024, True, True)),  # 22 (P5/32-large)
    ((16, 19, 22), 1, "v10Detect", ()),  # v10Detect(P3, P4, P5)
)

# Rows in which yolov10{s,m,b,l,x}.yaml differ from yolov10n.yaml.
_CIB_1024 = (-1, 3, "C2fCIB", (1024, True))
_V10_ROWS = {
    "n": {},
    "s": {8: (-1, 3, "C2fCIB", (1024, True, True))},
    "m": {8: _CIB_1024, 19: (-1, 3, "C2fCIB", (512, True)), 22: _CIB_1024},
    "b": {8: _CIB_1024, 13: (-1, 3, "C2fCIB", (512, True)), 19: (-1, 3, "C2fCIB", (512, True)), 22: _CIB_1024},
}
_V10_ROWS["l"] = _V10_ROWS["b"]
_V10_ROWS["x"] = {**_V10_ROWS["b"], 6: (-1, 6, "C2fCIB", (512, True))}


def yolov10_table(scale: str):
    """The rows of ``yolov10{scale}.yaml``."""
    return tuple(_V10_ROWS[scale].get(i, row) for i, row in enumerate(YOLOV10))


#: ``{arch: (table, {scale: (depth, width, max_channels)})}`` as in the yamls
#: (YOLOv10's table depends on the scale: :func:`yolov10_table`).
SCALES = {
    "yolov8": (YOLOV8, {
        "n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
        "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512),
    }),
    "yolo11": (YOLO11, {
        "n": (0.50, 0.25, 1024), "s": (0.50, 0.50, 1024), "m": (0.50, 1.00, 512),
        "l": (1.00, 1.00, 512), "x": (1.00, 1.50, 512),
    }),
    "yolo26": (YOLO26, {
        "n": (0.50, 0.25, 1024), "s": (0.50, 0.50, 1024), "m": (0.50, 1.00, 512),
        "l": (1.00, 1.00, 512), "x": (1.00, 1.50, 512),
    }),
    "yolov10": (YOLOV10, {
        "n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
        "b": (0.67, 1.00, 512), "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512),
    }),
}

#: ``(reg_max, end-to-end head)`` of each architecture: the yaml's ``reg_max``
#: and ``end2end`` (YOLOv10's ``v10Detect`` is end-to-end by itself).
HEAD = {"yolov8": (16, False), "yolo11": (16, False), "yolo26": (1, True), "yolov10": (16, True)}


def build_ultralytics(arch: str, scale: str, *, nc: int, reg_max: int | None = None, name: str, dtype=None,
                      rngs: nnx.Rngs) -> GraphModel:
    """``DetectionModel(f"{arch}{scale}.yaml", nc=nc)`` in NNX (upstream's inits).

    ``reg_max``: override the yaml's (16; YOLO26: 1); YOLOv10's ``v10Detect``
    has 16 whatever the yaml says, as upstream.
    """
    table, scales = SCALES[arch]
    if arch == "yolov10":
        table = yolov10_table(scale)
        if reg_max not in (None, 16):
            raise ValueError(f"reg_max: {arch}'s v10Detect head has reg_max 16, got {reg_max!r}")
    depth, width, max_channels = scales[scale]
    yaml_reg_max, end2end = HEAD[arch]
    layers, froms = parse_table(table, nc=nc, depth=depth, width=width, max_channels=max_channels, scale=scale,
                                reg_max=yaml_reg_max if reg_max is None else reg_max, end2end=end2end, dtype=dtype,
                                rngs=rngs)
    return GraphModel(layers, froms, name=name, family="ultralytics", dtype=dtype)
