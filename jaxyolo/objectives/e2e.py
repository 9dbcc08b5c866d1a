"""The end-to-end (NMS-free) detection losses of YOLOv10 and YOLO26.

An end-to-end head has two branches with the same layout: the one-to-many
branch (trained like YOLOv8, many positives per GT) and the one-to-one branch
(few positives per GT, so its top-scoring prediction per object needs no
NMS).  Each branch is scored by :func:`jaxyolo.yolov8_loss` with its own
task-aligned assignment; only the top-k settings and the way the two are
combined differ.  ultralytics 8.4.190, ``utils/loss.py``:

``variant="yolo26"`` (``E2ELoss``; in 8.4.190 every model with a one-to-one
head trains with it, YOLOv10 included)
  * one-to-many: TAL ``topk=10``; one-to-one: ``topk=7, topk2=1``;
  * ``total = o2m * L_o2m + o2o * L_o2o`` with ``o2o = max(1 - o2m, 0)`` and
    ``o2m`` from :func:`e2e_o2m_weight` (0.8 at epoch 0, linear to 0.1);
  * items: the one-to-one branch's, not weighted.

``variant="yolov10"`` (``E2EDetectLoss``, YOLOv10's own loss; 8.4.190 keeps
it for loading old checkpoints)
  * one-to-many: ``topk=10``; one-to-one: ``topk=1``;
  * ``total = L_o2m + L_o2o``; items: the sum of both branches' items.

``L_branch`` is upstream's ``loss * batch_size`` summed (``v8DetectionLoss``),
with DFL when ``reg_max > 1`` and the L1 distance term when ``reg_max == 1``
(YOLO26's DFL-free head; see :mod:`jaxyolo.objectives.tal`).

Upstream quirks, named once:

* ``E2ELoss.update()`` is called by the trainer at the *end* of every epoch,
  so epoch ``e`` (0-based) trains with ``decay(e)``; the decay divides by
  ``max(epochs - 1, 1)``, so the last epoch (``e = epochs - 1``) is the
  first to reach the final 0.1, and a one-epoch run never decays
  (:func:`e2e_o2m_weight`).
* ``E2ELoss`` reports the one-to-one items *unweighted* (not times ``o2o``)
  while the total weights them; ``E2EDetectLoss`` adds the two branches'
  items although the two have different assignments.
* the one-to-one branch's ``topk2=1`` runs after the multi-GT resolution, so
  a GT can lose all of its ``topk=7`` candidates to other GTs and get no
  positive at all (as upstream; :func:`jaxyolo.assign.tal.assign_core`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxyolo import _checks
from jaxyolo.objectives.tal import TalLossConfig, yolov8_loss
from jaxyolo.targets import Targets

E2E_VARIANTS = ("yolo26", "yolov10")

__all__ = ["E2E_VARIANTS", "E2ELossConfig", "e2e_loss", "e2e_o2m_weight"]


def e2e_o2m_weight(epoch, epochs, *, initial: float = 0.8, final: float = 0.1):
    """The one-to-many weight ``o2m`` that ``E2ELoss`` uses during ``epoch``.

    Upstream starts at ``o2m = initial`` and the trainer calls ``update()``
    after each epoch, which sets ``o2m = decay(updates)``::

        decay(x) = max(1 - x / max(epochs - 1, 1), 0) * (initial - final) + final

    so epoch ``e`` (0-based; also after ``--resume``, where upstream sets
    ``updates = start_epoch - 1`` and calls ``update()``) trains with
    ``decay(e)`` (``decay(0) = initial``).  The one-to-one weight is
    ``max(1 - o2m, 0)``.

    Args:
      epoch: the 0-based epoch, a Python int or an int/float array (traced
        under ``jit``: a new epoch is new data, not a new compile).
      epochs: the run's number of epochs (upstream ``hyp.epochs``), static int.
      initial, final: upstream's ``o2m`` at the start and its ``final_o2m``.

    Returns:
      scalar float32 ``o2m`` (an array of ``epoch``'s shape).
    """
    _checks.positive_int(epochs, "epochs")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):  # host: Python floats, as upstream
        return jnp.float32(max(1 - epoch / max(epochs - 1, 1), 0) * (initial - final) + final)
    e = jnp.asarray(epoch, jnp.float32)
    return jnp.maximum(1.0 - e / max(epochs - 1, 1), 0.0) * jnp.float32(initial - final) + jnp.float32(final)


@dataclasses.dataclass(frozen=True)
class E2ELossConfig:
    """Hyperparameters of :func:`e2e_loss` (hashable: a static jit argument).

    Attributes:
      variant: ``"yolo26"`` (``E2ELoss``) or ``"yolov10"`` (``E2EDetectLoss``);
        see the module docstring.
      reg_max: the head's ``reg_max`` (1 for YOLO26: no DFL; 16 for YOLOv10).
      box, cls, dfl: loss gains (``hyp.box/cls/dfl``, 7.5 / 0.5 / 1.5); ``dfl``
        scales the L1 term when ``reg_max == 1``.
      class_weights: optional per-class BCE weights (``model.class_weights``).
    """

    variant: str = "yolo26"
    reg_max: int = 1
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        _checks.choice(self.variant, E2E_VARIANTS, "config.variant")
        _checks.positive_int(self.reg_max, "config.reg_max")
        if self.class_weights is not None and not isinstance(self.class_weights, tuple):
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))

    def branch_configs(self) -> tuple[TalLossConfig, TalLossConfig]:
        """The ``(one-to-many, one-to-one)`` :class:`TalLossConfig` of the two branches."""
        common = dict(reg_max=self.reg_max, box=self.box, cls=self.cls, dfl=self.dfl, class_weights=self.class_weights)
        o2o = dict(topk=7, topk2=1) if self.variant == "yolo26" else dict(topk=1)
        return TalLossConfig(topk=10, **common), TalLossConfig(**o2o, **common)


def e2e_loss(
    preds_o2m,
    preds_o2o,
    targets: Targets,
    *,
    o2m_weight=None,
    strides=(8, 16, 32),
    config: E2ELossConfig = E2ELossConfig(),
    nc=None,
    batched: bool | None = None,
):
    """YOLO26 ``E2ELoss`` / YOLOv10 ``E2EDetectLoss`` (ultralytics 8.4.190).

    Args:
      preds_o2m, preds_o2o: the one-to-many and one-to-one branches' raw head
        outputs, per level ``(B, H_l, W_l, 4*reg_max + nc)`` channels-last
        (box channels first: DFL logits ltrb-major, or the 4 ltrb distances
        in grid units when ``reg_max == 1``; then the ``nc`` class logits).
        Same level shapes for both.
      targets: :class:`jaxyolo.Targets`, ``(B, M)`` padded, normalised cxcywh.
      o2m_weight: ``"yolo26"`` only: scalar one-to-many weight (float or
        traced array, e.g. :func:`e2e_o2m_weight` of the epoch: changing it
        does not recompile); ``None`` = 0.8, upstream's weight in epoch 0.
        Must be ``None`` for ``"yolov10"`` (both weights are 1).
      strides: pixels per cell of each level.
      config: :class:`E2ELossConfig`.
      nc: optional number of classes, to check the channel count exactly.
      batched: assignment path, as :func:`jaxyolo.yolov8_loss`.

    Returns:
      ``(total, items)``: ``total`` scalar float32 (the weighted sum of both
      branches' ``(box + cls + dfl) * B``); ``items`` dict of scalars
      ``"box"``, ``"cls"``, ``"dfl"`` (``"l1"`` when ``reg_max == 1``), gains
      applied, not multiplied by B, gradients stopped: the one-to-one
      branch's for ``"yolo26"``, the sum of both branches' for ``"yolov10"``.
    """
    if not isinstance(config, E2ELossConfig):
        raise TypeError(f"config must be an E2ELossConfig, got {type(config).__name__}")
    if config.variant == "yolov10" and o2m_weight is not None:
        raise ValueError("o2m_weight is YOLO26's (E2ELoss) schedule; E2EDetectLoss (variant 'yolov10') weights both branches 1")
    o2m = jnp.float32(0.8) if o2m_weight is None else jnp.asarray(o2m_weight, jnp.float32)
    if o2m.shape != ():
        raise ValueError(f"o2m_weight must be a scalar, got shape {o2m.shape}")
    cfg_o2m, cfg_o2o = config.branch_configs()
    kw = dict(strides=strides, nc=nc, batched=batched)
    total_o2m, items_o2m = yolov8_loss(preds_o2m, targets, config=cfg_o2m, **kw)
    total_o2o, items_o2o = yolov8_loss(preds_o2o, targets, config=cfg_o2o, **kw)
    if config.variant == "yolov10":
        return total_o2m + total_o2o, {k: items_o2m[k] + items_o2o[k] for k in items_o2m}
    o2o = jnp.maximum(1.0 - o2m, 0.0)
    return total_o2m * o2m + total_o2o * o2o, items_o2o  # yolov8_loss's items: gradients already stopped
