"""The training configuration (frozen, JSON round-trippable, saved in checkpoints)."""

from __future__ import annotations

import dataclasses
import json

__all__ = ["TrainConfig", "LOSSES", "OPTIMIZERS", "PRECISIONS", "RECIPES", "SCHEDULES", "ULTRALYTICS_RECIPE"]

LOSSES = ("yolov8", "e2e", "yolov5", "yolox")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adamw", "musgd", "auto")
SCHEDULES = ("cosine", "linear")
RECIPES = ("jaxyolo", "ultralytics")

# ultralytics' cfg/default.yaml (8.4.x) values of the fields the recipe sets:
# optimizer auto, lr0 0.01, lrf 0.01, momentum 0.937, weight_decay 5e-4,
# warmup_epochs 3, warmup_momentum 0.8, warmup_bias_lr 0.1, nbs 64,
# cos_lr False (a linear LambdaLR), close_mosaic 10, and BaseTrainer's fixed
# clip_grad_norm_(max_norm=10) and ModelEMA(decay=0.9999, tau=2000).
ULTRALYTICS_RECIPE = dict(
    recipe="ultralytics", optimizer="auto", lr0=0.01, lrf=0.01, momentum=0.937, weight_decay=5e-4, warmup_epochs=3.0,
    warmup_momentum=0.8, warmup_bias_lr=0.1, nbs=64, schedule="linear", close_mosaic=10, grad_clip=10.0,
    ema_decay=0.9999, ema_tau=2000.0,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on.

    Attributes:
      model: jaxyolo's own ``"pico" | "nano" | "small"`` (YOLOv8-style
        backbone, the head of ``loss``), or an upstream architecture of
        :data:`jaxyolo.models.MODELS` (``"yolov8n"``, ``"yolo11s"``,
        ``"yolov5m"``, ``"yolox-nano"`` ...), whose family sets the loss.
      loss: ``"yolov8" | "e2e" | "yolov5" | "yolox"``; None: the model's family
        (``"yolov8"`` for the own models; ``"e2e"``, ultralytics' ``E2ELoss``
        with its one-to-many weight decaying over ``epochs``, for YOLO26 and
        YOLOv10).
      weights: initial weights for an upstream ``model``: a jaxyolo weights
        folder (``jaxyolo convert``) or an upstream ``.pt``/``.pth``; tensors
        whose path and shape match are loaded (a different ``nc`` keeps the
        class predictions freshly initialised).
      data: ``"embedded"``, an Ultralytics ``data.yaml``, a COCO folder
        (``annotations/instances_<split>*.json``) or ``.json`` file, or a
        plain ``images/`` + ``labels/`` folder (:func:`jaxyolo.data.load_data`).
      images: the images folder of a single COCO ``.json`` ``data``.
      nc: number of classes, checked against the dataset's names (None: from the dataset).
      epochs, img_size, batch: the usual.
      train_size, val_size: number of embedded images (ignored for a directory).
      max_boxes: M, the padded number of boxes per image (static shape) of
        the stored labels and of the augmented targets the loss sees (a
        mosaic holds up to 4 images' boxes: boxes beyond M are cut and
        counted in the ``boxes_cut`` log column).  None (default): the most
        objects in one training image rounded up to a multiple of 8, at
        least 32 (:func:`jaxyolo.train.loop.default_max_boxes`; resolved when
        the run starts and saved so).  The assigners' work and memory grow
        linearly with M (TAL's and SimOTA's ``(B, M, A)`` metrics and costs).
      recipe: ``"jaxyolo"`` (default: this trainer's own short-run recipe,
        below) or ``"ultralytics"``: ultralytics' ``BaseTrainer`` semantics
        step for step (:func:`TrainConfig.from_recipe` sets its values;
        :mod:`jaxyolo.train.optim`): per-group LRs (conv/linear weights with
        decay, BatchNorm weights and all biases without), warmup per
        iteration over ``round(min(warmup_epochs, epochs - 1) * nb)``
        iterations (bias LR from ``warmup_bias_lr``, the others from 0, SGD
        momentum from ``warmup_momentum``, the accumulation count from 1),
        a LambdaLR stepped per epoch (``schedule`` "linear" or "cosine" =
        upstream's ``cos_lr``), gradients of the ``loss x B`` total summed
        over ``accumulate = max(round(nbs / batch), 1)`` batches, clipped at
        ``grad_clip`` and stepped with ``weight_decay * batch * accumulate /
        nbs``, the EMA updated at each optimizer step with ``ema_decay``,
        ``ema_tau`` (their defaults 0.9999, 2000).  ``warmup_min_steps`` is
        not used by it.
      optimizer: ``"sgd"`` (Nesterov, momentum), ``"adamw"`` (betas
        ``(momentum, 0.999)``) or ``"musgd"`` (ultralytics' MuSGD: Muon on
        conv/linear kernels plus Nesterov SGD, momentum = Muon's beta, the
        head's class branches at lr x3; :func:`jaxyolo.train.muon.musgd`);
        ``"auto"`` (recipe "ultralytics" only): upstream's rule, AdamW with
        ``lr0 = round(0.002 * 5 / (4 + nc), 6)``, beta1 0.9 and
        ``warmup_bias_lr`` 0 for runs of at most 10 000 iterations, MuSGD
        with lr0 0.01, momentum 0.9 and ``warmup_bias_lr`` 0 beyond.
      lr0: peak learning rate; lrf: final LR as a fraction of lr0.
      momentum: SGD / MuSGD momentum (also Muon's beta) / AdamW beta1 (0.937 as YOLO).
      weight_decay: on conv kernels only (not BatchNorm, not biases).
      warmup_epochs: linear warmup from 0 to lr0 (at least ``warmup_min_steps`` steps).
      warmup_momentum, warmup_bias_lr: recipe "ultralytics" only: SGD's
        momentum and the bias group's LR at the start of the warmup.
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
      mosaic, degrees, translate, scale, shear, perspective, hsv_h, hsv_s, hsv_v, flipud, fliplr:
        the augmentations at ultralytics' default strengths
        (:class:`jaxyolo.data.augment.AugmentConfig`; 0 disables one), run on
        the device inside the train step, drawn from ``(seed, step)``;
        ``mosaic`` is the probability of a 4-image mosaic.
      mosaic_buffer: 0: a mosaic's 3 other images are drawn from the whole
        dataset; W > 0: from the samples of the last W batches, the
        deterministic form of ultralytics' buffer (``max_buffer_length`` =
        8 batches there), which lets a streamed dataset decode ~1 image per
        sample instead of 4 (:class:`jaxyolo.data.TrainBatches`).
      close_mosaic: no mosaic in the last this many epochs (ultralytics
        defaults to 10 of 100+ epochs; here 4 of the default 12, see docs/training.md).
      precision: ``"fp32"`` or ``"bf16"``: convolutions and activations in
        bfloat16; parameters, optimiser state, EMA and BatchNorm statistics
        in float32, and the losses computed in float32.
      seed: model init and data order.
      conf_thres, iou_thres, max_det: the evaluation NMS, ``yolo val``'s
        (multi-label; ``max_det`` raised to the most labels in one val image,
        as ultralytics raises its default 300).  An end-to-end model (YOLO26,
        YOLOv10) keeps its one-to-one branch's top ``max_det`` scores above
        ``conf_thres``, no NMS (:func:`jaxyolo.evaluate.end2end_topk`).
      nms: end-to-end models only: evaluate (and predict) with the
        one-to-many branch and NMS instead, upstream's ``nms=True``.
      eval_every: evaluate mAP every this many epochs (and always at the end;
        pycocotools' COCO mAP at the end only).
      max_steps: stop (with a checkpoint) after this many global steps; for
        interrupted runs and tests.  None: run all epochs.
    """

    model: str = "pico"
    recipe: str = "jaxyolo"
    loss: str | None = None
    weights: str | None = None
    data: str = "embedded"
    images: str | None = None
    nc: int | None = None
    epochs: int = 12
    img_size: int = 128
    batch: int = 16
    train_size: int = 3000
    val_size: int = 400
    max_boxes: int | None = None
    optimizer: str = "adamw"
    lr0: float = 0.003
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_min_steps: int = 50
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    schedule: str = "cosine"
    nbs: int = 64
    grad_clip: float | None = 10.0
    ema_decay: float = 0.9999
    ema_tau: float | None = None
    mosaic: float = 1.0
    mosaic_buffer: int = 0
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    flipud: float = 0.0
    fliplr: float = 0.5
    close_mosaic: int = 4
    precision: str = "fp32"
    seed: int = 0
    conf_thres: float = 0.001
    iou_thres: float = 0.7
    max_det: int = 300
    nms: bool = False
    eval_every: int = 2
    max_steps: int | None = None

    def __post_init__(self):
        from jaxyolo.models import MODEL_SIZES, MODELS

        if self.model in MODEL_SIZES:
            family = None
            if self.weights is not None:
                raise ValueError(f"weights: only the upstream architectures load weights, not model={self.model!r}")
        elif self.model in MODELS:
            family = MODELS[self.model].head_type
        else:
            raise ValueError(f"model must be one of {', '.join(MODEL_SIZES)} or an upstream architecture ({', '.join(MODELS)}), got {self.model!r}")
        if self.loss is None:
            object.__setattr__(self, "loss", family or "yolov8")
        elif family is None and self.loss == "e2e":
            raise ValueError(f"loss='e2e' needs an end-to-end architecture (yolo26n..x, yolov10n..x), not model={self.model!r}")
        elif family is not None and self.loss != family:
            raise ValueError(f"loss={self.loss!r} does not fit model={self.model!r}, whose loss is {family!r} (leave --loss out)")
        for name, choices in (("recipe", RECIPES), ("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.recipe == "ultralytics":
            if self.loss == "yolox":
                raise ValueError("loss='yolox' does not fit recipe='ultralytics': its gradient accumulation sums losses that are x B (yolov8, yolov5); YOLOX's is a mean")
            if self.grad_clip is None:
                raise ValueError("grad_clip: recipe='ultralytics' clips at a norm (upstream's 10.0), got None")
        elif self.optimizer == "auto":
            raise ValueError("optimizer='auto' is ultralytics' rule: only with recipe='ultralytics'")
        for name in ("lrf", "momentum", "warmup_momentum"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        for name in ("weight_decay", "warmup_epochs", "warmup_bias_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0.0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.ema_tau is not None and not self.ema_tau > 0:
            raise ValueError(f"ema_tau must be > 0 or None, got {self.ema_tau!r}")
        for name in ("epochs", "img_size", "batch", "max_boxes", "train_size", "val_size", "nbs", "max_det", "eval_every"):
            v = getattr(self, name)
            if v is None and name == "max_boxes":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {self.img_size}")
        if not self.lr0 > 0:
            raise ValueError(f"lr0 must be > 0, got {self.lr0}")
        if not isinstance(self.mosaic_buffer, int) or isinstance(self.mosaic_buffer, bool) or self.mosaic_buffer < 0:
            raise ValueError(f"mosaic_buffer must be an int >= 0, got {self.mosaic_buffer!r}")
        if not isinstance(self.close_mosaic, int) or self.close_mosaic < 0:
            raise ValueError(f"close_mosaic must be an int >= 0, got {self.close_mosaic!r}")
        self.augment_config()  # validates the strengths

    def augment_config(self, *, mosaic: bool = True):
        """The :class:`~jaxyolo.data.augment.AugmentConfig` of this run
        (``mosaic=False``: the same without mosaic, for the closing epochs)."""
        from jaxyolo.data.augment import AugmentConfig

        names = [f.name for f in dataclasses.fields(AugmentConfig)]
        try:
            aug = AugmentConfig(**{k: getattr(self, k) for k in names})
        except ValueError as e:
            raise ValueError(str(e).replace("AugmentConfig.", "")) from None
        return aug if mosaic else dataclasses.replace(aug, mosaic=0.0)

    def mosaic_in_epoch(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) samples 4-image mosaics."""
        return self.mosaic > 0 and epoch < self.epochs - self.close_mosaic

    @classmethod
    def from_recipe(cls, recipe: str = "jaxyolo", **overrides) -> TrainConfig:
        """The config of a named recipe, with ``overrides`` (any field) on top.

        ``"jaxyolo"``: ``TrainConfig()``'s defaults.  ``"ultralytics"``:
        :data:`ULTRALYTICS_RECIPE`, ultralytics' default training
        hyperparameters with its trainer's semantics (see ``recipe`` in
        :class:`TrainConfig`).  The run's own settings (model, data, epochs,
        img_size, batch, augmentation strengths: already ultralytics'
        defaults) keep this class's defaults unless overridden.
        """
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if "recipe" in overrides and overrides["recipe"] != recipe:
            raise ValueError(f"recipe: from_recipe({recipe!r}) was also given recipe={overrides['recipe']!r}")
        base = dict(ULTRALYTICS_RECIPE) if recipe == "ultralytics" else {}
        return cls(**{**base, **overrides, "recipe": recipe})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def own_model(self) -> bool:
        """True for jaxyolo's pico/nano/small, False for an upstream architecture."""
        from jaxyolo.models import MODEL_SIZES

        return self.model in MODEL_SIZES

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)
