"""The upstream architectures by name: one table, ``build_model(name, nc=...)``.

==============================  ==============  =========  ==========================
names                           upstream        loss       defined in
==============================  ==============  =========  ==========================
``yolov8{n,s,m,l,x}``           ultralytics     yolov8     ``cfg/models/v8/yolov8.yaml``
``yolo11{n,s,m,l,x}``           ultralytics     yolov8     ``cfg/models/11/yolo11.yaml``
``yolo26{n,s,m,l,x}``           ultralytics     e2e        ``cfg/models/26/yolo26.yaml``
``yolov10{n,s,m,b,l,x}``        ultralytics     e2e        ``cfg/models/v10/yolov10*.yaml``
``yolov5{n,s,m,l,x}``           yolov5          yolov5     ``models/yolov5{n,s,m,l,x}.yaml``
``yolox-{nano,tiny,s,m,l,x}``   yolox           yolox      ``yolox/exp/default/yolox_*.py``
==============================  ==============  =========  ==========================
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from flax import nnx

from jaxyolo.models import ultralytics, yolov5, yolox

__all__ = ["MODELS", "ModelSpec", "build_model", "get_spec", "model_loss"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
      name: registry name (``"yolov8n"``).
      family: the upstream package: ``"ultralytics"``, ``"yolov5"`` or ``"yolox"``.
      head_type: the loss family (``"yolov8"``, ``"e2e"``, ``"yolov5"``, ``"yolox"``).
      scale: the upstream scale key (``"n"``, ``"nano"`` ...).
      builder: ``builder(*, nc, name, dtype, rngs, **family_kwargs) -> model``.
    """

    name: str
    family: str
    head_type: str
    scale: str
    builder: Callable[..., nnx.Module]


def _table() -> dict[str, ModelSpec]:
    out = {}
    for arch in ("yolov8", "yolo11", "yolo26", "yolov10"):
        head_type = "e2e" if ultralytics.HEAD[arch][1] else "yolov8"
        for s in ultralytics.SCALES[arch][1]:
            out[arch + s] = ModelSpec(arch + s, "ultralytics", head_type, s, functools.partial(ultralytics.build_ultralytics, arch, s))
    for s in yolov5.SCALES:
        out["yolov5" + s] = ModelSpec("yolov5" + s, "yolov5", "yolov5", s, functools.partial(yolov5.build_yolov5, s))
    for s in yolox.SCALES:
        out["yolox-" + s] = ModelSpec("yolox-" + s, "yolox", "yolox", s, functools.partial(yolox.build_yolox, s))
    return out


#: ``{name: ModelSpec}`` for every supported upstream architecture.
MODELS: dict[str, ModelSpec] = _table()


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, *, nc: int, seed: int = 0, dtype=None, **kwargs) -> nnx.Module:
    """Build an upstream architecture, randomly initialised as upstream does.

    Args:
      name: a :data:`MODELS` name (``"yolov8n"``, ``"yolo11s"``, ``"yolov5m"``, ``"yolox-nano"`` ...).
      nc: number of classes.
      seed: parameter-init seed.
      dtype: computation dtype (``None``: float32; e.g. ``jnp.bfloat16``);
        parameters and BatchNorm statistics stay float32, head outputs come
        in this dtype (the losses compute in float32).
      **kwargs: family options: ``anchors`` ``(L, na, 2)`` pixels (yolov5),
        ``reg_max`` (ultralytics).

    Returns:
      the model, in train mode (as a fresh torch module); see
      :class:`jaxyolo.models.graph.GraphModel` and :class:`jaxyolo.models.yolox.YOLOX`
      for the interface.
    """
    spec = get_spec(name)
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise ValueError(f"nc must be a positive int, got {nc!r}")
    return spec.builder(nc=nc, name=name, dtype=dtype, rngs=nnx.Rngs(seed), **kwargs)


def model_loss(model, preds, targets, *, o2m_weight=None):
    """The loss of ``model``'s family with upstream's default hyperparameters:
    ``yolov8_loss`` (ultralytics ``v8DetectionLoss``), ``e2e_loss`` (``E2ELoss``,
    which ultralytics 8.4.190 trains every end-to-end model with, YOLOv10
    included), ``yolov5_loss`` (``ComputeLoss``, initial level balance) or
    ``yolox_loss`` (``get_losses``).

    Args:
      model: any jaxyolo detector (``head_type``, ``strides``, ``head``).
      preds: ``model(images)``.
      targets: :class:`jaxyolo.Targets` ``(B, M)``.
      o2m_weight: end-to-end models only: the one-to-many weight
        (:func:`jaxyolo.e2e_o2m_weight` of the epoch); None: 0.8 (epoch 0).

    Returns:
      ``(total, components)`` as the loss returns them (scalar float32, dict).
    """
    import jaxyolo

    if o2m_weight is not None and model.head_type != "e2e":
        raise ValueError(f"o2m_weight: only end-to-end models have one, {model.name} is a {model.head_type} model")
    if model.head_type == "yolov8":
        config = jaxyolo.TalLossConfig(reg_max=model.head.reg_max)
        return jaxyolo.yolov8_loss(preds, targets, strides=model.strides, config=config)
    if model.head_type == "e2e":
        config = jaxyolo.E2ELossConfig(reg_max=model.head.reg_max)
        return jaxyolo.e2e_loss(preds["one2many"], preds["one2one"], targets, o2m_weight=o2m_weight, strides=model.strides,
                                config=config)
    if model.head_type == "yolov5":
        total, parts, _ = jaxyolo.yolov5_loss(preds, targets, anchors=model.head.anchor_array, strides=model.strides)
        return total, parts
    return jaxyolo.yolox_loss(preds, targets, strides=model.strides)
