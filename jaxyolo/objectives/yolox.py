"""The YOLOX loss (``YOLOXHead.get_losses`` of ``yolox==0.3.0``) in JAX.

Shapes: ``B`` images, ``M`` padded GT slots per image, ``L`` levels,
``A = sum_l H_l W_l`` anchors, ``nc`` classes.

Decoding (``get_output_and_grid``): per level the raw ``(B, H, W, 5 + nc)``
outputs are ``(x, y, w, h, obj, cls...)``; the box is
``xy = (raw_xy + grid) * s`` and ``wh = exp(raw_wh) * s`` in **pixels**, with
``grid`` the integer ``(x, y)`` cell index.  Targets are normalised cxcywh
(:class:`jaxyolo.Targets`); they are converted to pixels with the input image
size ``(H_0 s_0, W_0 s_0)``, which every level must agree on.

Loss (sums over the batch, then each divided by ``N = max(num_fg, 1)`` with
``num_fg`` the positives of the whole batch):

* ``iou``  = ``reg_weight * sum_fg (1 - IoU(pred, gt)**2) / N``;
* ``obj``  = ``sum_all BCE(obj, fg) / N`` over every anchor;
* ``cls``  = ``sum_fg sum_c BCE(cls, onehot * IoU) / N`` (target under
  ``stop_gradient``: upstream builds it under ``no_grad``);
* ``l1``   = ``sum_fg |raw_reg - [gt_xy / s - grid, log(gt_wh / s + 1e-8)]| / N``
  when ``use_l1`` (YOLOX switches it on for the last 15 epochs), else 0;
* ``total = iou + obj + cls + l1``; ``num_fg_per_gt = max(num_fg, 1) / max(num_gts, 1)``.
  *Upstream quirk*: ``num_fg`` is clamped to 1 before this ratio is taken, so
  a batch without GTs reports ``num_fg_per_gt = 1``, not 0.  Reproduced.

Upstream notes (reproduced where they affect numbers):

* **Empty images**: upstream counts an image's GTs as the label rows whose
  five numbers sum to ``> 0`` and takes the *first* ``num_gt`` rows; here the
  :class:`Targets` mask decides, so real rows need not be contiguous.  An image
  (or a whole batch) without GTs contributes only the objectness loss against
  0, exactly as upstream.
* **float16**: upstream computes the class cost in float32 (``autocast``
  disabled) but the IoU in the input dtype; everything here is float32.
* **CPU fallback**: upstream retries the assignment on the CPU after a CUDA OOM
  (and then calls ``.cuda()``); there is no such path here, nor a need for it.
* **Bad class ids** under ``jit`` make ``total`` and its gradients NaN (see
  :meth:`Targets.invalid`, which also flags non-finite boxes in real rows);
  outside ``jit`` bad class ids raise ``ValueError``.
* **Overflow**: the decode bounds the raw box logits (``|x|, |y| <= 2**40``
  cells, ``w, h <= exp(32)`` strides) before ``exp`` and the stride product,
  far beyond any image (upstream's values and gradients there are IoU 0 and
  0 to float32 precision), so a finite logit never decodes to ``inf`` and an
  overflowing box has IoU 0 with finite gradients.  NaN logits pass through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxyolo import _checks
from jaxyolo._math import clamp_keep_nan, nan_if
from jaxyolo.assign.tal import resolve_batched
from jaxyolo.assign.yolox import SIMOTA_VARIANTS, VARIANT_DEFAULTS, simota
from jaxyolo.boxes import make_anchor_points
from jaxyolo.losses import bce_with_logits, yolox_iou_loss
from jaxyolo.targets import Targets

__all__ = ["YoloxLossConfig", "yolox_loss", "yolox_decode"]

#: Bounds of the raw box logits in the decode: any box beyond them is far
#: outside every image (IoU 0), and ``xy``, ``wh`` and the IoU's products stay
#: finite for strides up to ``2**10`` (see the module docstring).
_XY_LIMIT = 2.0**40
_LOG_WH_LIMIT = 32.0


@dataclasses.dataclass(frozen=True)
class YoloxLossConfig:
    """Hyperparameters of the YOLOX loss (frozen, hashable: a static jit arg).

    Attributes:
      center_radius: centre-prior radius in strides.  ``None`` resolves to the
        variant's value on construction (2.5 for ``"0.3.0"``, 1.5 for ``"main"``).
      candidate_topk: ``n_candidate_k`` cap of the dynamic-k IoU sum (10).
      cost_iou_weight: weight of the IoU term in the SimOTA cost (3.0).
      reg_weight: weight of the IoU loss (5.0).
      use_l1: add the L1 loss on raw regression outputs (upstream ``use_l1``).
      variant: ``"0.3.0"`` (the pinned oracle) or ``"main"`` (YOLOX's later
        geometry: centre-only prior, radius 1.5, penalty 1e6).  Beyond upstream.
      geometry_penalty: cost outside the geometry prior; ``None`` resolves to
        ``1e5`` (``"0.3.0"``) or ``1e6`` (``"main"``).
      strict_conflicts: resolve an anchor chosen by several GTs among those GTs
        only.  Beyond upstream (which takes the argmin over all GTs).
    """

    center_radius: float | None = None
    candidate_topk: int = 10
    cost_iou_weight: float = 3.0
    reg_weight: float = 5.0
    use_l1: bool = False
    variant: str = "0.3.0"
    geometry_penalty: float | None = None
    strict_conflicts: bool = False

    def __post_init__(self):
        _checks.choice(self.variant, SIMOTA_VARIANTS, "variant")
        _checks.positive_int(self.candidate_topk, "candidate_topk")
        radius, penalty = VARIANT_DEFAULTS[self.variant]
        if self.center_radius is None:
            object.__setattr__(self, "center_radius", radius)
        if self.geometry_penalty is None:
            object.__setattr__(self, "geometry_penalty", penalty)


def _level_shapes(preds, strides, image_size):
    preds = _checks.level_list(preds, "preds", "(B, H, W, 5 + nc)")
    strides = tuple(strides)
    if len(strides) != len(preds):
        raise ValueError(f"strides must have one entry per level: {len(preds)} levels, {len(strides)} strides")
    for i, p in enumerate(preds):
        _checks.ndim(p, 4, f"preds[{i}]", "(B, H, W, 5 + nc)")
        if p.shape[-1] < 6:
            raise ValueError(f"preds[{i}] must have 5 + nc channels (x, y, w, h, obj, cls...) with nc >= 1, got {p.shape}")
    _checks.levels_agree(preds, "preds", "5 + nc")
    if image_size is None:
        sizes = {(p.shape[1] * s, p.shape[2] * s) for p, s in zip(preds, strides)}
        if len(sizes) != 1:
            raise ValueError(
                "level shapes disagree on the input image size (H * stride, W * stride): "
                + ", ".join(f"preds[{i}] {p.shape[1:3]} x {s}" for i, (p, s) in enumerate(zip(preds, strides)))
                + "; pass image_size=(H, W) explicitly"
            )
        image_size = sizes.pop()
    else:
        if len(tuple(image_size)) != 2:
            raise ValueError(f"image_size must be (H, W) in pixels, got {image_size!r}")
    return preds, strides, (float(image_size[0]), float(image_size[1]))


def _decode(preds, strides, channels):
    """``yolox_decode`` on the first ``channels`` channels only (levels concatenated)."""
    batch = preds[0].shape[0]
    raw = jnp.concatenate([p[..., :channels].reshape(batch, p.shape[1] * p.shape[2], channels) for p in preds], axis=1)
    grid, stride = make_anchor_points([p.shape[1:3] for p in preds], strides, offset=0.0)
    stride = stride[:, 0]
    return raw, _decode_boxes(raw[..., :4], grid, stride), grid, stride


def _decode_boxes(raw_box, grid, stride):
    """``(B, A, 4)`` raw ``(x, y, w, h)`` logits -> cxcywh pixels, overflow-bounded."""
    raw_xy = clamp_keep_nan(raw_box[..., :2], -_XY_LIMIT, _XY_LIMIT)
    xy = (raw_xy + grid[None]) * stride[None, :, None]
    wh = jnp.exp(clamp_keep_nan(raw_box[..., 2:4], hi=_LOG_WH_LIMIT)) * stride[None, :, None]
    return jnp.concatenate([xy, wh], axis=-1)


def yolox_decode(preds, *, strides=(8, 16, 32)):
    """Concatenate and decode per-level raw outputs as upstream ``get_output_and_grid``.

    Args:
      preds: ``L`` arrays ``(B, H_l, W_l, 5 + nc)`` raw outputs.
      strides: pixels per cell of each level.

    Returns:
      ``(raw, boxes, grid, stride)``: ``raw`` ``(B, A, 5 + nc)`` (levels
      concatenated, row-major cells); ``boxes`` ``(B, A, 4)`` decoded cxcywh
      pixels; ``grid`` ``(A, 2)`` cell ``(x, y)`` in grid units; ``stride``
      ``(A,)`` pixels.
    """
    preds, strides, _ = _level_shapes(preds, strides, image_size=(1, 1))
    return _decode(preds, strides, preds[0].shape[-1])

@jax.custom_vjp
def _gather_positives(levels, pos, slot):
    """``x[b, pos[b, p]]`` of ``x`` the levels' ``(B, A_l, C)`` concatenated: ``(B, P, C)``.

    ``pos`` lists each image's positives in its first slots (the rest point
    anywhere; their cotangent must be 0) and ``slot`` ``(B, A)`` is its
    inverse: the slot of each positive anchor, ``P`` for the others.  Taking
    the levels apart avoids building the concatenated ``(B, A, C)`` array, and
    the backward pass is the inverse gather ``g[b, slot[b, a]]`` (0 off the
    positives), the same values as the plain gather's scatter-add into a zeroed
    ``(B, A, C)`` buffer at a fraction of the memory traffic (the bottleneck on CPU).
    """
    out, start = 0.0, 0
    for x in levels:
        n = x.shape[1]
        rows = jnp.take_along_axis(x, jnp.clip(pos - start, 0, n - 1)[..., None], axis=1)
        out = jnp.where(((pos >= start) & (pos < start + n))[..., None], rows, out)
        start += n
    return out


def _gather_positives_fwd(levels, pos, slot):
    return _gather_positives(levels, pos, slot), (slot, tuple(x.shape[1] for x in levels))


def _gather_positives_bwd(res, g):
    slot, sizes = res
    # slot P (off the positives) reads an appended zero row; the barrier keeps
    # XLA from fusing the gather elementwise into its consumer (much slower)
    g = jnp.concatenate([g, jnp.zeros_like(g[:, :1])], axis=1)
    grads, start = [], 0
    for n in sizes:
        grads.append(jax.lax.optimization_barrier(jnp.take_along_axis(g, slot[:, start : start + n, None], axis=1)))
        start += n
    return tuple(grads), None, None


_gather_positives.defvjp(_gather_positives_fwd, _gather_positives_bwd)


def yolox_loss(
    preds,
    targets: Targets,
    *,
    strides: Sequence[int] = (8, 16, 32),
    config: YoloxLossConfig = YoloxLossConfig(),
    image_size=None,
    return_assignment: bool = False,
    batched: bool | None = None,
):
    """YOLOX loss with SimOTA assignment, as ``YOLOXHead.get_losses`` (yolox 0.3.0).

    Args:
      preds: ``L`` arrays ``(B, H_l, W_l, 5 + nc)`` raw head outputs
        ``(x, y, w, h, obj, cls...)`` (channels-last; bf16 is computed in float32).
      targets: :class:`jaxyolo.Targets` with ``(B, M, ...)`` normalised cxcywh.
      strides: pixels per cell of each level (static).
      config: :class:`YoloxLossConfig` (static).
      image_size: ``(H, W)`` input pixels; default ``(H_l * s_l, W_l * s_l)``,
        which must agree across levels.
      return_assignment: also return the batched :class:`SimOTAAssignment`.
      batched: assignment path.  ``None`` (default): auto from the backend,
        ``jax.default_backend()`` at trace time (the accelerator path on
        gpu/tpu, the CPU path on cpu); ``True``/``False`` force the
        accelerator/CPU path.  Both give identical assignments, and values
        and gradients equal to float32 rounding (XLA may fuse the batched
        IoUs differently: 1 ulp seen on CPU).  Here the accelerator path runs
        SimOTA on all images at once (``vmap``), the CPU path one image at a
        time (``lax.map``).

    Returns:
      ``(total, components)``: ``total`` scalar float32; ``components`` a dict
      ``{"iou" (already x reg_weight), "obj", "cls", "l1", "num_fg_per_gt"}`` of
      scalars, each already divided by ``max(num_fg, 1)`` as upstream returns
      them (``l1`` is 0 without ``use_l1``).  With ``return_assignment`` a third
      element, the assignment with a leading ``B`` axis.
    """
    if not isinstance(config, YoloxLossConfig):
        raise TypeError(f"config must be a YoloxLossConfig, got {type(config).__name__}")
    preds, strides, (img_h, img_w) = _level_shapes(preds, strides, image_size)
    nc = preds[0].shape[-1] - 5
    targets = targets.checked(nc=nc)
    batch = preds[0].shape[0]
    if targets.batch_size != batch:
        raise ValueError(f"targets has batch size {targets.batch_size} but preds have B={batch}")

    # Only the 5 box/objectness channels are concatenated over levels; the
    # (B, A_l, nc) class logits stay per level (see ``simota``'s cls_logits).
    raw, boxes, grid, stride = _decode(preds, strides, 5)
    obj = raw[..., 4]
    cls = tuple(p[..., 5:].reshape(batch, p.shape[1] * p.shape[2], nc) for p in preds)
    scale = jnp.asarray([img_w, img_h, img_w, img_h], jnp.float32)
    gt_boxes = targets.boxes * scale  # (B, M, 4) pixels
    gt_mask = targets.mask

    # CPU path: one image at a time (``lax.map``): every (M, A) and (A_l, nc)
    # intermediate of SimOTA is then a per-image buffer of ~1-2 MB that XLA
    # reuses across images and calls, instead of a (B, M, A) array freshly
    # allocated (and page-faulted) on every call: ~25% faster on CPU.  On an
    # accelerator that loop serialises B small problems, so the accelerator
    # path maps the same function with ``vmap`` (one (B, M, A) problem).
    # The class logits enter as the raw (A_l, 5 + nc) level rows and are
    # sliced inside, so no (B, A_l, nc) copy is made either.
    level_rows = tuple(p.reshape(batch, p.shape[1] * p.shape[2], 5 + nc) for p in preds)

    def assign_one(args):
        b, o, rows, g, k, m = args
        return simota(
            b,
            o,
            [r[:, 5:] for r in rows],
            grid,
            stride,
            g,
            k,
            m,
            center_radius=config.center_radius,
            candidate_topk=config.candidate_topk,
            cost_iou_weight=config.cost_iou_weight,
            geometry_penalty=config.geometry_penalty,
            variant=config.variant,
            strict_conflicts=config.strict_conflicts,
        )

    per_image = (boxes, obj, level_rows, gt_boxes, targets.classes, gt_mask)
    if resolve_batched(batched):
        assignment = jax.vmap(assign_one)(per_image)
    else:
        assignment = jax.lax.map(assign_one, per_image)
    fg = assignment.fg_mask  # (B, A)
    gt_idx = jnp.maximum(assignment.matched_gt, 0)  # (B, A), 0 for background (masked away)
    matched_boxes = jnp.take_along_axis(gt_boxes, gt_idx[..., None], axis=1)  # (B, A, 4)
    matched_cls = jnp.take_along_axis(targets.classes, gt_idx, axis=1)  # (B, A)

    num_fg = jnp.sum(assignment.num_fg).astype(jnp.float32)
    num_gts = jnp.sum(gt_mask).astype(jnp.float32)
    denom = jnp.maximum(num_fg, 1.0)

    # double where: the background's raw box logits (NaN, inf, anything) are
    # zeroed before the decode, so no 0 * NaN reaches their gradient (``boxes``
    # itself only feeds the assignment, under stop_gradient)
    boxes_fg = _decode_boxes(jnp.where(fg[..., None], raw[..., :4], 0.0), grid, stride)
    iou_term = yolox_iou_loss(boxes_fg, jax.lax.stop_gradient(matched_boxes))  # (B, A)
    loss_iou = jnp.sum(jnp.where(fg, iou_term, 0.0)) / denom
    loss_obj = jnp.sum(bce_with_logits(obj, fg.astype(jnp.float32))) / denom
    # The class loss touches positives only: gather them into a static (B, P, nc)
    # slab, P = min(A, M * candidate_topk) >= any possible num_fg of an image
    # (each GT takes at most candidate_topk anchors), instead of (B, A, nc).
    num_anchors = raw.shape[1]
    slots = min(num_anchors, targets.max_boxes * config.candidate_topk)
    if slots > 0:
        # positives first, in anchor order: slot = rank among the image's positives
        slot = jnp.where(fg, jnp.cumsum(fg, axis=1, dtype=jnp.int32) - 1, slots)  # (B, A); P off fg
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slot.shape)
        anchor_ids = jnp.broadcast_to(jnp.arange(num_anchors, dtype=jnp.int32)[None, :], slot.shape)
        pos = jnp.zeros((batch, slots), jnp.int32).at[rows, slot].set(anchor_ids, mode="drop")
        pos_valid = jnp.arange(slots)[None, :] < assignment.num_fg[:, None]
        cls_pos = _gather_positives(cls, pos, slot)  # (B, P, nc)
        onehot = jax.nn.one_hot(jnp.take_along_axis(matched_cls, pos, axis=1), nc, dtype=jnp.float32)
        iou_pos = jnp.take_along_axis(assignment.matched_iou, pos, axis=1)
        cls_target = jax.lax.stop_gradient(onehot * iou_pos[..., None])
        loss_cls = jnp.sum(jnp.where(pos_valid[..., None], bce_with_logits(cls_pos, cls_target), 0.0)) / denom
    else:
        loss_cls = jnp.zeros((), jnp.float32)
    if config.use_l1:
        s = stride[None, :, None]
        l1_target = jnp.concatenate(
            [matched_boxes[..., :2] / s - grid[None], jnp.log(matched_boxes[..., 2:] / s + 1e-8)], axis=-1
        )
        l1_target = jax.lax.stop_gradient(l1_target)
        raw_fg = jnp.where(fg[..., None], raw[..., :4], l1_target)  # double where, as the IoU term
        loss_l1 = jnp.sum(jnp.where(fg[..., None], jnp.abs(raw_fg - l1_target), 0.0)) / denom
    else:
        loss_l1 = jnp.zeros((), jnp.float32)

    iou_weighted = config.reg_weight * loss_iou
    total = iou_weighted + loss_obj + loss_cls + loss_l1
    total = nan_if(targets.invalid(nc), total)
    components = {
        "iou": iou_weighted,
        "obj": loss_obj,
        "cls": loss_cls,
        "l1": loss_l1,
        "num_fg_per_gt": denom / jnp.maximum(num_gts, 1.0),  # upstream quirk: max(num_fg, 1)
    }
    if return_assignment:
        return total, components, assignment
    return total, components
