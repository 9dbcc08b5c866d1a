"""The training configuration (frozen, JSON round-trippable, saved in checkpoints)."""

from __future__ import annotations

import dataclasses
import json

__all__ = ["TrainConfig", "LOSSES", "OPTIMIZERS", "PRECISIONS", "SCHEDULES"]

LOSSES = ("yolov8", "yolov5", "yolox")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on.

    Attributes:
      loss: ``"yolov8" | "yolov5" | "yolox"``; also picks the head.
      data: ``"embedded"`` or a YOLO dataset directory.
      nc: number of classes for a YOLO directory (None: from classes.txt or labels).
      epochs, img_size, batch: the usual.
      model_size: ``"pico" | "nano" | "small"`` (:data:`jaxyolo.models.MODEL_SIZES`).
      train_size, val_size: number of embedded images (ignored for a directory).
      max_boxes: M, the padded number of boxes per image (static shape).
      optimizer: ``"sgd"`` (Nesterov, momentum) or ``"adamw"`` (betas ``(momentum, 0.999)``).
      lr0: peak learning rate; lrf: final LR as a fraction of lr0.
      momentum: SGD momentum / AdamW beta1 (0.937 as YOLO).
      weight_decay: on conv kernels only (not BatchNorm, not biases).
      warmup_epochs: linear warmup from 0 to lr0 (at least ``warmup_min_steps`` steps).
      schedule: decay after warmup, ``"cosine"`` or ``"linear"`` to ``lr0 * lrf``.
      nbs: nominal batch size.  YOLOv5/v8 losses come back multiplied by B;
        upstream sums ``nbs / B`` accumulated batches before a step, so their
        gradient is ``nbs x`` the per-image mean.  The objective here is
        ``total * nbs / B`` (same scale, no accumulation, every batch steps).
        YOLOX's loss is already a mean; upstream scales its LR by
        ``B / 64`` instead, and so does this trainer for ``loss="yolox"``
        with SGD (AdamW is invariant to the loss scale: lr0 as is).
      grad_clip: max global gradient norm (None: no clipping).
      ema_decay, ema_tau: ModelEMA ``d = ema_decay * (1 - exp(-updates / tau))``;
        ``ema_tau=None`` picks ``total_steps / 5`` (see :func:`ema_tau_for`).
      flip: horizontal flip probability (drawn on the device from ``(seed, step)``).
      precision: ``"fp32"`` or ``"bf16"``: convolutions and activations in
        bfloat16; parameters, optimiser state, EMA and BatchNorm statistics
        in float32, and the losses computed in float32.
      seed: model init and data order.
      conf_thres, iou_thres, max_det: evaluation NMS.
      eval_every: evaluate mAP every this many epochs (and always at the end).
      max_steps: stop (with a checkpoint) after this many global steps; for
        interrupted runs and tests.  None: run all epochs.
    """

    loss: str = "yolov8"
    data: str = "embedded"
    nc: int | None = None
    epochs: int = 12
    img_size: int = 128
    batch: int = 16
    model_size: str = "pico"
    train_size: int = 3000
    val_size: int = 400
    max_boxes: int = 16
    optimizer: str = "adamw"
    lr0: float = 0.003
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_min_steps: int = 50
    schedule: str = "cosine"
    nbs: int = 64
    grad_clip: float | None = 10.0
    ema_decay: float = 0.9999
    ema_tau: float | None = None
    flip: float = 0.5
    precision: str = "fp32"
    seed: int = 0
    conf_thres: float = 0.001
    iou_thres: float = 0.7
    max_det: int = 100
    eval_every: int = 2
    max_steps: int | None = None

    def __post_init__(self):
        for name, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("epochs", "img_size", "batch", "max_boxes", "train_size", "val_size", "nbs", "max_det", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {self.img_size}")
        if not self.lr0 > 0:
            raise ValueError(f"lr0 must be > 0, got {self.lr0}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)
