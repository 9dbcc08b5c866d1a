"""YOLOv5 ``ComputeLoss`` (yolov5 7.0) as a pure, static-shape JAX function.

    config = jaxyolo.scale_yolov5_hyp(jaxyolo.Yolov5LossConfig(), nc=80, num_levels=3, img_size=640)
    total, comps, state = jaxyolo.yolov5_loss(preds, targets, anchors=ANCHORS, strides=(8, 16, 32), config=config)

Layout: each level's predictions are channels-last ``(B, H, W, na, 5 + nc)`` raw
logits ``[x, y, w, h, obj, cls...]`` (upstream's are ``(B, na, H, W, 5 + nc)``).
A ``(B, H, W, na * (5 + nc))`` head output is accepted too and split as
``(na, 5 + nc)``.

What upstream does, and how it is reproduced:

* Targets: :func:`jaxyolo.assign.yolov5_build_targets` (anchor ratio < ``anchor_t``,
  neighbour cells, clamped cells) as masked candidate slots.
* Box: ``pxy = 2 sigmoid - 0.5``, ``pwh = (2 sigmoid)^2 * anchor`` (grid units),
  CIoU with yolov5's ``alpha = v / (v - iou + (1 + eps))``; ``mean(1 - CIoU)``
  over the level's positives, 0 for a level without any.
* Objectness: BCE (``obj_pw``) over every cell against ``tobj``, whose positives
  hold ``(1 - gr) + gr * CIoU.detach().clamp(0)``; times ``balance[level]``.
* **Duplicate cells.**  Several candidates can write the same
  ``(image, anchor, gj, gi)`` (two boxes in one cell, or a neighbour slot landing
  on another box's cell).  Upstream's ``tobj[b, a, gj, gi] = iou`` is a serial
  ``index_put`` with one torch thread, so the *last* candidate in its order
  (offset, anchor, target) wins.  XLA leaves ``.at[].set`` with duplicate indices
  unspecified, so here each cell takes a **scatter-max of the candidates' order
  ids** and only the winner's value is written (unique indices, deterministic).
  With ``sort_obj_iou=True`` upstream first sorts the candidates by ascending IoU
  (``torch.argsort``, not stable), so the highest IoU is written last and wins;
  candidates with tied IoU write identical values, so the instability cannot
  change ``tobj``: here it is a scatter-max of the (clamped, ``gr``-mixed) IoU.
* Class: BCE (``cls_pw``) against ``cp``/``cn`` from ``smooth_bce(label_smoothing)``,
  mean over ``positives x nc``; skipped when ``nc == 1`` as upstream.
  ``fl_gamma > 0`` wraps both BCEs in yolov5's ``FocalLoss(gamma, alpha=0.25)``.
* ``autobalance``: ``balance[i] <- 0.9999 balance[i] + 0.0001 / obj_i`` after
  level ``i`` is used, then everything is divided by the stride-16 level's
  weight.  Upstream keeps this in the ``ComputeLoss`` object via ``.item()``;
  here it is explicit state: pass ``new_state`` back as ``state`` on the next
  call (no host sync, jit-friendly).  Upstream holds the weights as Python
  doubles, here they are float32 (relative drift ~1e-7 per call).
* ``total = (box * lbox + obj * lobj + cls * lcls) * B``.  Upstream returns it
  with shape ``(1,)`` and the components as one detached ``(3,)`` tensor
  ``cat((lbox, lobj, lcls))``; here ``total`` is a scalar and ``components`` is
  ``{"box", "obj", "cls"}`` of (stop-gradient) scalars.

Gains are used as given.  yolov5's ``train.py`` rescales ``box``, ``cls`` and
``obj`` for the number of levels, classes and the image size *before* building
``ComputeLoss``; :func:`scale_yolov5_hyp` applies the same rescaling.

Bad class ids: outside ``jit`` a real row with a class outside ``[0, nc)`` is a
``ValueError``; under ``jit`` (where it cannot raise) the total and its
gradients are NaN (also for a non-finite box in a real row: :meth:`Targets.invalid`).

Hostile predictions: only the candidates' rows and the objectness channel are
read, as upstream.  Unused candidate slots gather cell 0 and are zeroed before
use (double where), so a NaN/inf in any cell that is no candidate changes
neither the value nor any gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxyolo import _checks
from jaxyolo._math import nan_if
from jaxyolo.assign.yolov5 import build_targets_stacked, yolov5_anchors_and_strides
from jaxyolo.boxes import bbox_iou
from jaxyolo.losses import bce_with_logits, focal_loss, masked_mean, smooth_bce
from jaxyolo.targets import Targets

__all__ = ["Yolov5LossConfig", "yolov5_loss", "scale_yolov5_hyp", "yolov5_default_balance"]

#: Upstream's objectness level weights: ``{3: [4.0, 1.0, 0.4]}.get(nl, P3-P7 list)``.
_BALANCE_3 = (4.0, 1.0, 0.4)
_BALANCE_P3_P7 = (4.0, 1.0, 0.25, 0.06, 0.02)


@dataclasses.dataclass(frozen=True)
class Yolov5LossConfig:
    """Hyperparameters of yolov5's ``ComputeLoss`` (names and defaults of
    ``data/hyps/hyp.scratch-low.yaml``, *before* train.py's rescaling -- see
    :func:`scale_yolov5_hyp`).  Frozen and hashable: a static ``jit`` argument.

    Attributes:
      box, obj, cls: loss gains.
      cls_pw, obj_pw: BCE ``pos_weight`` of the class / objectness terms.
      anchor_t: anchor-multiple threshold (strict ``<``).
      fl_gamma: focal-loss gamma; ``> 0`` wraps both BCEs in ``FocalLoss``.
      label_smoothing: class label smoothing eps (``smooth_BCE``).
      gr: objectness IoU ratio; upstream's ``ComputeLoss`` hard-codes ``1.0``.
      autobalance: update the level weights after each call (state).
      sort_obj_iou: upstream's ``ComputeLoss.sort_obj_iou`` (highest IoU wins a
        shared cell instead of the last candidate).
      balance: objectness level weights; ``None`` -> ``(4.0, 1.0, 0.4)`` for 3
        levels, else the first ``L`` of ``(4.0, 1.0, 0.25, 0.06, 0.02)``.
    """

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    cls_pw: float = 1.0
    obj_pw: float = 1.0
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0
    gr: float = 1.0
    autobalance: bool = False
    sort_obj_iou: bool = False
    balance: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma", "label_smoothing", "gr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"Yolov5LossConfig.{name} must be a finite Python number, got {value!r}")
        if self.anchor_t <= 0:
            raise ValueError(f"Yolov5LossConfig.anchor_t must be > 0, got {self.anchor_t}")
        if self.fl_gamma < 0:
            raise ValueError(f"Yolov5LossConfig.fl_gamma must be >= 0, got {self.fl_gamma}")
        if self.balance is not None:
            object.__setattr__(self, "balance", tuple(float(b) for b in self.balance))

    def hyp(self) -> dict[str, float]:
        """The upstream ``hyp`` dict entries that ``ComputeLoss`` reads."""
        keys = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma", "label_smoothing")
        return {k: getattr(self, k) for k in keys}


def yolov5_default_balance(num_levels: int, balance: Sequence[float] | None = None) -> tuple[float, ...]:
    """The objectness level weights for ``num_levels`` levels (upstream's default
    when ``balance`` is None)."""
    if balance is None:
        balance = _BALANCE_3 if num_levels == 3 else _BALANCE_P3_P7
    balance = tuple(float(b) for b in balance)
    if len(balance) < num_levels:
        raise ValueError(f"balance has {len(balance)} weights but there are {num_levels} levels (upstream supports <= 5)")
    return balance[:num_levels]


def scale_yolov5_hyp(hyp, *, nc: int, num_levels: int = 3, img_size: int = 640):
    """Apply yolov5 ``train.py``'s rescaling of the loss gains.

    ``box *= 3 / nl``, ``cls *= nc / 80 * 3 / nl``, ``obj *= (img_size / 640) ** 2 * 3 / nl``
    (in Python doubles, as upstream).  ``train.py`` also overwrites
    ``label_smoothing`` with its command-line value; set it yourself.

    Args:
      hyp: a :class:`Yolov5LossConfig` or an upstream ``hyp`` dict.
      nc: number of classes.
      num_levels: ``nl``, the number of detection levels.
      img_size: training image size in pixels (``--imgsz``).

    Returns:
      The same kind of object with the three gains rescaled.
    """
    nc = _checks.positive_int(nc, "nc")
    nl = _checks.positive_int(num_levels, "num_levels")
    img_size = _checks.positive_int(img_size, "img_size")
    if isinstance(hyp, Yolov5LossConfig):
        box, cls, obj = hyp.box, hyp.cls, hyp.obj
    elif isinstance(hyp, Mapping):
        box, cls, obj = hyp["box"], hyp["cls"], hyp["obj"]
    else:
        raise TypeError(f"hyp must be a Yolov5LossConfig or a dict, got {type(hyp).__name__}")
    box *= 3 / nl
    cls *= nc / 80 * 3 / nl
    obj *= (img_size / 640) ** 2 * 3 / nl
    if isinstance(hyp, Yolov5LossConfig):
        return dataclasses.replace(hyp, box=box, cls=cls, obj=obj)
    return {**hyp, "box": box, "cls": cls, "obj": obj}


def _split_levels(preds, na):
    """Validate the prediction levels; returns ``[(B, H, W, na, 5 + nc)] float32`` and nc."""
    out = []
    for i, p in enumerate(_checks.level_list(preds, "preds", "(B, H, W, na, 5 + nc)")):
        name = f"preds[{i}]"
        if p.ndim == 4:
            c = p.shape[-1]
            if c % na or c // na < 6:
                raise ValueError(
                    f"{name} has {c} channels, which is not na * (5 + nc) with na = {na} anchors and nc >= 1"
                )
            p = p.reshape(p.shape[:3] + (na, c // na))
        if p.ndim != 5:
            raise ValueError(f"{name} must have shape (B, H, W, na, 5 + nc), got {tuple(p.shape)}")
        if p.shape[3] != na:
            raise ValueError(f"{name} has {p.shape[3]} anchors on axis 3 but anchors define na = {na}")
        if p.shape[4] < 6:
            raise ValueError(f"{name} must have 5 + nc channels with nc >= 1, got {p.shape[4]}")
        out.append(p)
    _checks.levels_agree(out, "preds", "na and 5 + nc")
    return out, out[0].shape[4] - 5


def _check_grid(preds, strides):
    """Every level must cover the same image: ``H * stride`` and ``W * stride`` agree."""
    sizes = [(p.shape[1] * s, p.shape[2] * s) for p, s in zip(preds, strides)]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise ValueError(
                f"preds[{i}] grid {preds[i].shape[1:3]} at stride {strides[i]:g} covers {size[0]:g}x{size[1]:g} px, "
                f"but preds[0] {preds[0].shape[1:3]} at stride {strides[0]:g} covers {sizes[0][0]:g}x{sizes[0][1]:g} px: "
                "a level's H x W does not match its stride"
            )


def _bce(config: Yolov5LossConfig, logits, target, pos_weight):
    """Unreduced BCE or yolov5 ``FocalLoss(BCE, gamma=fl_gamma, alpha=0.25)``."""
    if config.fl_gamma > 0:
        return focal_loss(logits, target, gamma=config.fl_gamma, alpha=0.25, pos_weight=pos_weight)
    return bce_with_logits(logits, target, pos_weight=pos_weight)


def yolov5_loss(preds, targets: Targets, *, anchors, strides, config: Yolov5LossConfig = Yolov5LossConfig(), state=None):
    """YOLOv5's ``ComputeLoss(model)(p, targets)`` (see the module docstring).

    Args:
      preds: list of ``L`` arrays ``(B, H_l, W_l, na, 5 + nc)`` raw logits
        (channels-last; or ``(B, H_l, W_l, na * (5 + nc))``).  bf16/fp16 are
        computed in float32.
      targets: :class:`~jaxyolo.Targets` (``boxes (B, M, 4)`` normalised cxcywh).
      anchors: ``(L, na, 2)`` anchor sizes in **pixels** (yaml values).
      strides: ``L`` strides in pixels (static Python numbers).
      config: :class:`Yolov5LossConfig` (static).
      state: ``{"balance": (L,) float32}`` from a previous call, or None for the
        initial weights.  Only ``autobalance`` changes it.

    Returns:
      ``(total, components, new_state)``: ``total`` scalar float32 (upstream:
      shape ``(1,)``), ``components = {"box", "obj", "cls"}`` scalars after the
      gains (stop-gradient, upstream's detached ``(3,)`` tensor), ``new_state``
      ``{"balance": (L,)}`` (stop-gradient).

    Notes:
      * Reverse mode (``jax.grad``/``value_and_grad``, also nested) and
        ``jax.vmap`` are supported; forward mode (``jax.jvp``/``jacfwd``) w.r.t.
        ``preds`` is not (the cell gather has a custom VJP for speed).
      * Anchors are used as given.  yolov5's ``train.py`` runs
        ``model.half().float()`` which rounds the anchors to fp16 precision; the
        yaml anchors are integers, so this only matters for AutoAnchor output.
    """
    if not isinstance(config, Yolov5LossConfig):
        raise TypeError(f"config must be a Yolov5LossConfig, got {type(config).__name__}")
    anchors_grid, strides = yolov5_anchors_and_strides(anchors, strides)
    nl, na = anchors_grid.shape[0], anchors_grid.shape[1]
    preds, nc = _split_levels(preds, na)
    if len(preds) != nl:
        raise ValueError(f"preds has {len(preds)} levels but anchors/strides describe {nl}")
    _check_grid(preds, strides)
    targets = Targets.checked(targets, nc=nc, name="targets")
    bsz = preds[0].shape[0]
    if targets.batch_size != bsz:
        raise ValueError(f"targets has batch size {targets.batch_size} but preds have {bsz}")

    if state is None:
        balance = jnp.asarray(yolov5_default_balance(nl, config.balance), jnp.float32)
    else:
        if not isinstance(state, Mapping) or "balance" not in state:
            raise TypeError('state must be None or {"balance": (L,) array} returned by a previous call')
        balance = _checks.float_array(state["balance"], 'state["balance"]').astype(jnp.float32)
        if balance.shape != (nl,):
            raise ValueError(f'state["balance"] must have shape ({nl},), got {tuple(balance.shape)}')
    if config.autobalance:
        if 16.0 not in strides:
            raise ValueError(f"autobalance normalises by the stride-16 level, but strides are {strides}")
        ssi = strides.index(16.0)

    lt = build_targets_stacked(targets, anchors_grid, [p.shape[1:3] for p in preds], anchor_t=config.anchor_t).flat()
    lbox_l, obj_l, lcls_l = _losses(preds, lt, config, nc)  # (L,) each
    lbox = lobj = lcls = jnp.zeros((), jnp.float32)
    new_balance = []
    for i in range(nl):  # upstream's accumulation order
        lbox = lbox + lbox_l[i]
        lobj = lobj + obj_l[i] * balance[i]
        if nc > 1:
            lcls = lcls + lcls_l[i]
        if config.autobalance:
            new_balance.append(balance[i] * 0.9999 + 0.0001 / jax.lax.stop_gradient(obj_l[i]))
    if config.autobalance:
        new_balance = jnp.stack(new_balance)
        new_balance = new_balance / new_balance[ssi]
    else:
        new_balance = balance

    lbox = lbox * config.box
    lobj = lobj * config.obj
    lcls = lcls * config.cls
    total = (lbox + lobj + lcls) * bsz
    total = nan_if(targets.invalid(nc), total)
    components = {k: jax.lax.stop_gradient(v) for k, v in (("box", lbox), ("obj", lobj), ("cls", lcls))}
    return total, components, {"balance": jax.lax.stop_gradient(new_balance)}


@jax.custom_vjp
def _gather_cells(p_flat, cell):
    """``(p_flat[cell], p_flat[:, 4])`` for ``p_flat (ncell, 5 + nc)``, ``cell (K,)``.

    A custom VJP so the backward pass writes the full ``(ncell, 5 + nc)``
    gradient once (objectness column padded, then the K candidate rows
    scatter-added in place) instead of autodiff's zeros + scatter + add of two
    full-size buffers.  Numerically the same sums; it costs forward-mode
    (``jax.jvp``) support, which no training loop needs.
    """
    return jnp.take(p_flat, cell, axis=0), p_flat[:, 4]


def _gather_cells_fwd(p_flat, cell):
    return _gather_cells(p_flat, cell), (cell, p_flat.shape[1])


def _gather_cells_bwd(res, grads):
    cell, c = res
    g_rows, g_obj = grads
    base = jnp.pad(g_obj[:, None], ((0, 0), (4, c - 5)))
    return base.at[cell].add(g_rows), None


_gather_cells.defvjp(_gather_cells_fwd, _gather_cells_bwd)


def _losses(preds, lt, config: Yolov5LossConfig, nc: int):
    """Per-level box, objectness and class terms (before gains and balance).

    ``preds``: ``L`` arrays ``(B, H, W, na, 5 + nc)`` float32 logits; ``lt``:
    level-stacked, flat :class:`~jaxyolo.assign.yolov5.Yolov5LevelTargets`
    (``(L, K)`` candidates).  Candidates of all levels are processed as one
    ``(L, K)`` batch; only the gathers and the objectness scatter are per level.
    Returns three ``(L,)`` arrays.
    """
    mask = lt.mask  # (L, K)
    k = mask.shape[1]
    rows, obj_logits, cells, sizes = [], [], [], []
    base = 0
    for i, p in enumerate(preds):
        bsz, h, w, na, c = p.shape
        ncell = bsz * h * w * na
        cell = ((lt.image[i] * h + lt.gj[i]) * w + lt.gi[i]) * na + lt.anchor[i]  # (K,) flat (b, gj, gi, a)
        cell = jnp.where(mask[i], cell, 0)
        ps, obj = _gather_cells(p.reshape(ncell, c), cell)
        rows.append(ps)
        obj_logits.append(obj)
        cells.append(cell + base)  # index into the concatenation of all levels' cells
        sizes.append(ncell)
        base += ncell
    # (L, K, 5 + nc) prediction subsets; unused slots (which read cell 0) are
    # zeroed: double where, so a NaN there reaches neither value nor gradient
    ps = jnp.where(mask[..., None], jnp.stack(rows), 0.0)
    cell = jnp.stack(cells)  # (L, K)

    # Box regression (grid units).  Unused slots get a benign unit box.
    pxy = jax.nn.sigmoid(ps[..., :2]) * 2 - 0.5
    pwh = (jax.nn.sigmoid(ps[..., 2:4]) * 2) ** 2 * lt.anchor_wh
    tbox = jnp.where(mask[..., None], lt.tbox, jnp.asarray([0.5, 0.5, 1.0, 1.0], jnp.float32))
    iou = bbox_iou(jnp.concatenate([pxy, pwh], axis=-1), tbox, xywh=True, kind="ciou", convention="yolov5")
    lbox = masked_mean(1.0 - iou, mask, axis=1)

    # Objectness target: one writer per cell (see the module docstring).
    score = jnp.maximum(jax.lax.stop_gradient(iou), 0.0)
    if config.gr < 1:
        score = (1.0 - config.gr) + config.gr * score
    dropped = jnp.where(mask, cell, base).reshape(-1)  # out of range -> dropped by the scatter
    if config.sort_obj_iou:
        tobj = jnp.zeros((base,), jnp.float32).at[dropped].max(score.reshape(-1), mode="drop")
    else:
        order = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), mask.shape).reshape(-1)
        last = jnp.full((base,), -1, jnp.int32).at[dropped].max(order, mode="drop")
        winner = mask.reshape(-1) & (last[cell.reshape(-1)] == order)
        tobj = jnp.zeros((base,), jnp.float32).at[jnp.where(winner, dropped, base)].add(
            jnp.where(winner, score.reshape(-1), 0.0), mode="drop"
        )
    obj_all = _bce(config, jnp.concatenate(obj_logits), tobj, config.obj_pw)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    lobj = jnp.stack([jnp.mean(obj_all[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))])

    # Classification.
    if nc > 1:
        onehot = jax.nn.one_hot(lt.classes, nc, dtype=jnp.bool_)
        t = jnp.where(onehot, *smooth_bce(config.label_smoothing)).astype(jnp.float32)
        lcls = masked_mean(_bce(config, ps[..., 5:], t, config.cls_pw), mask[..., None], axis=(1, 2))
    else:
        lcls = jnp.zeros((len(preds),), jnp.float32)
    return lbox, lobj, lcls
