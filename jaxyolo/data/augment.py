"""YOLO training augmentations on the device: mosaic, random affine, HSV, flips.

Pure JAX, static shapes, jit-able, independent per image, deterministic from
a ``jax.random`` key; no Python loop over images and no host callback.  They
reproduce ultralytics 8.4.190's ``v8_transforms`` (``Mosaic(n=4)`` ->
``RandomPerspective`` -> ``RandomHSV`` -> ``RandomFlip`` up/down ->
``RandomFlip`` left/right) at its default hyperparameters; the tests call those
upstream classes with their random draws fixed and compare pixels and boxes.

Inputs (the host sampler gathers them with one vectorised index per batch):

* ``images`` ``(B, K, S, S, 3)`` uint8: for each output image, K stored
  letterboxed frames (:mod:`jaxyolo.data.images`); K = 4 when mosaic is on
  (the sample itself first, then 3 other images drawn uniformly from the
  dataset, upstream's ``Mosaic.get_indexes`` with images cached in RAM), K = 1
  without mosaic.  An image whose frames 1-3 have empty content rectangles
  is never mosaicked: :func:`pad_to_mosaic` turns a K = 1 batch into such a
  K = 4 batch, whose augmentation is the K = 1 batch's, bit for bit, so one
  compiled train step serves the epochs with and without mosaic.
* ``rects`` ``(B, K, 4)`` int32 ``[top, left, h, w]``: each frame's content
  rectangle (``DetectionData.content_rects``).  Upstream's mosaic tiles are
  the un-padded resized images, so the rectangle, not the S x S frame, is
  what goes into the mosaic.
* ``targets`` :class:`jaxyolo.Targets` with leading dims ``(B, K, M)``:
  ``boxes (B, K, M, 4)`` normalised cxcywh of the S x S frame, ``classes (B,
  K, M)`` int32, ``mask (B, K, M)`` bool.

Output: ``images (B, S, S, 3)`` uint8, ``Targets (B, M_out)`` normalised
cxcywh of the output image (survivors compacted to the front in upstream's
order: tile 0's boxes first), and ``dropped (B,)`` int32, the number of
surviving boxes beyond ``M_out`` (cut; the trainer can log it).

Mosaic and the affine warp are ONE inverse-mapped bilinear sample per output
pixel: output pixel -> inverse matrix -> point on the virtual 2S x 2S mosaic
canvas -> which tile / which source pixel (or the 114 fill) for each of the
four bilinear taps.  No canvas is materialised.  The interpolation follows
OpenCV 5's float ``warpAffine(INTER_LINEAR, borderValue=114)`` kernel (tap
weights ``p00 + fx (p01 - p00)`` then along y, round half to even); our inverse
matrix is computed in float32 where OpenCV inverts in float64, so a few
pixels at sharp edges differ by one level.

Without mosaic (``mosaic=0``, or the per-image draw says no) upstream warps
the un-padded resized image, centred on its own centre, into an S x S output
with a 114 border.  Sampling the stored letterboxed frame (whose padding is
114 already) with the centre of its content rectangle is the same thing.

HSV follows ``RandomHSV``: per image gains ``r = U(-1, 1)^3 * (h, s, v)``,
lookup tables ``hue = (x + 180 r_h) mod 180``, ``sat = clip(x (1 + r_s))``
(``sat[0] = 0``), ``val = clip(x (1 + r_v))``, through OpenCV's uint8
RGB->HSV (H in [0, 180), integer arithmetic, reproduced exactly) and its
uint8 HSV->RGB.  The latter is OpenCV's SIMD float kernel, which truncates and
(on FMA machines, where upstream trains) fuses ``1 - s h``: we tabulate its
per-(hue, saturation) factors on the host with that fused rounding, so the
conversion equals cv2's for all 2^24 inputs (checked exhaustively).  The
tables are computed in float32 on the device where upstream uses float64, so
a table entry can differ when ``x + 180 r`` falls within float32 rounding of
an integer.

Box rules: mosaic boxes are moved by their tile offset, clipped to the 2S
canvas and dropped if their area is zero (``Mosaic._cat_labels``); the warp
maps the 4 corners (divided by w for a perspective), takes their min/max,
clips to the output, and keeps ``box_candidates(wh_thr=2, ar_thr=100,
area_thr=0.1)`` against the pre-warp box scaled by the drawn scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.targets import Targets

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "augment",
    "apply_augment",
    "box_candidates",
    "hsv_augment",
    "pad_to_mosaic",
    "params_from_uniform",
    "sample_params",
    "N_UNIFORM",
]

PAD_VALUE = 114


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths, defaults = ultralytics ``default.yaml``; 0 disables.

    Attributes:
      mosaic: probability of a 4-image mosaic (needs K = 4 sources).
      degrees: rotation range ``+-degrees``.
      translate: translation range ``0.5 +- translate`` of the output side.
      scale: scale gain range ``1 +- scale``.
      shear: shear range ``+-shear`` degrees.
      perspective: perspective range ``+-perspective``.
      hsv_h, hsv_s, hsv_v: HSV gain ranges.
      flipud, fliplr: flip probabilities.
    """

    mosaic: float = 1.0
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

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
                raise ValueError(f"AugmentConfig.{f.name} must be a finite number >= 0, got {v!r}")
        for name in ("mosaic", "flipud", "fliplr"):
            if getattr(self, name) > 1:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.scale >= 1:
            raise ValueError(f"AugmentConfig.scale must be < 1 (scale gain 1 +- scale), got {self.scale}")


class AugmentParams(NamedTuple):
    """The random draws of one batch, per image (build by hand in tests).

    Attributes:
      mosaic: ``(B,)`` bool, this image is a mosaic.
      center: ``(B, 2)`` int32 ``[xc, yc]`` mosaic centre on the 2S canvas (pixels).
      matrix: ``(B, 3, 3)`` float32, canvas pixels -> output pixels (upstream's M).
      scale: ``(B,)`` float32, the drawn scale (``box_candidates`` compares with it).
      hsv: ``(B, 3)`` float32 ``RandomHSV`` gains ``r`` (``U(-1, 1) * (h, s, v)``).
      flipud, fliplr: ``(B,)`` bool.
    """

    mosaic: jax.Array
    center: jax.Array
    matrix: jax.Array
    scale: jax.Array
    hsv: jax.Array
    flipud: jax.Array
    fliplr: jax.Array


# ------------------------------------------------------------- parameters

# Uniform [0, 1) draws per image, in this column order (upstream's call order
# within each transform): mosaic?, yc, xc, perspective x, y, angle, scale,
# shear x, y, translate x, y, hsv h, s, v, flipud?, fliplr?
N_UNIFORM = 16


def _lerp(u, lo, hi):
    return lo + (hi - lo) * u


def params_from_uniform(u, rects, *, config: AugmentConfig, size: int, mosaic_ok: bool = True) -> AugmentParams:
    """Turn uniform draws into parameters exactly as upstream maps ``random.uniform(a, b)``.

    Args:
      u: ``(B, N_UNIFORM)`` float32 in ``[0, 1)`` (column order above).
      rects: ``(B, K, 4)`` int32 content rectangles (the single-image warp is
        centred on image 0's).
      config: strengths.
      size: S.
      mosaic_ok: False when K = 1 (no mosaic possible).  With K = 4, an
        image whose frames 1-3 are empty (``h`` or ``w`` 0: :func:`pad_to_mosaic`)
        is not mosaicked either.

    Returns:
      :class:`AugmentParams`.
    """
    c, s = config, float(size)
    u = jnp.asarray(u, jnp.float32)
    mosaic = (u[:, 0] < c.mosaic) if (mosaic_ok and c.mosaic > 0) else jnp.zeros(u.shape[:1], bool)
    if mosaic_ok and rects.shape[1] == 4:
        mosaic = mosaic & jnp.all((rects[:, 1:, 2] > 0) & (rects[:, 1:, 3] > 0), axis=1)  # three partner images
    # Mosaic.get_params: yc, xc = int(uniform(-border, 2 s + border)), border = -s // 2.
    lo, hi = float(size // 2), 2 * s - size // 2
    yc = jnp.floor(_lerp(u[:, 1], lo, hi)).astype(jnp.int32)
    xc = jnp.floor(_lerp(u[:, 2], lo, hi)).astype(jnp.int32)
    # RandomPerspective._compute_affine_matrix (M = T @ S @ R @ P @ C).
    top, left, h, w = (rects[:, 0, i].astype(jnp.float32) for i in range(4))
    cx = jnp.where(mosaic, s, left + w / 2)  # mosaic: the 2S canvas centre; else the content centre
    cy = jnp.where(mosaic, s, top + h / 2)
    b = u.shape[0]
    eye = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (b, 3, 3))
    C = eye.at[:, 0, 2].set(-cx).at[:, 1, 2].set(-cy)
    P = eye.at[:, 2, 0].set(_lerp(u[:, 3], -c.perspective, c.perspective)).at[:, 2, 1].set(_lerp(u[:, 4], -c.perspective, c.perspective))
    a = jnp.deg2rad(_lerp(u[:, 5], -c.degrees, c.degrees))
    sc = _lerp(u[:, 6], 1 - c.scale, 1 + c.scale)
    ca, sa = sc * jnp.cos(a), sc * jnp.sin(a)  # cv2.getRotationMatrix2D(center=(0, 0), angle, scale)
    R = eye.at[:, 0, 0].set(ca).at[:, 0, 1].set(sa).at[:, 1, 0].set(-sa).at[:, 1, 1].set(ca)
    Sh = eye.at[:, 0, 1].set(jnp.tan(jnp.deg2rad(_lerp(u[:, 7], -c.shear, c.shear))))
    Sh = Sh.at[:, 1, 0].set(jnp.tan(jnp.deg2rad(_lerp(u[:, 8], -c.shear, c.shear))))
    T = eye.at[:, 0, 2].set(_lerp(u[:, 9], 0.5 - c.translate, 0.5 + c.translate) * s)
    T = T.at[:, 1, 2].set(_lerp(u[:, 10], 0.5 - c.translate, 0.5 + c.translate) * s)
    hp = jax.lax.Precision.HIGHEST
    M = jnp.matmul(T, jnp.matmul(Sh, jnp.matmul(R, jnp.matmul(P, C, precision=hp), precision=hp), precision=hp), precision=hp)
    gains = jnp.asarray([c.hsv_h, c.hsv_s, c.hsv_v], jnp.float32)
    hsv = _lerp(u[:, 11:14], -1.0, 1.0) * gains
    return AugmentParams(
        mosaic=mosaic,
        center=jnp.stack([xc, yc], -1),
        matrix=M,
        scale=sc,
        hsv=hsv,
        flipud=u[:, 14] < c.flipud,
        fliplr=u[:, 15] < c.fliplr,
    )


def sample_params(key, rects, *, config: AugmentConfig, size: int) -> AugmentParams:
    """Draw one batch's parameters from ``key`` (independent per image).

    Args:
      key: a ``jax.random`` key (e.g. ``fold_in(PRNGKey(seed), step)``).
      rects: ``(B, K, 4)`` int32 content rectangles.
    """
    u = jax.random.uniform(key, (rects.shape[0], N_UNIFORM), jnp.float32)
    return params_from_uniform(u, rects, config=config, size=size, mosaic_ok=rects.shape[1] == 4)


# ---------------------------------------------------------------- geometry


def _tiles(rects, params: AugmentParams, size: int):
    """Where each canvas quadrant's pixels come from, per image.

    Quadrant q (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right of the
    mosaic centre) holds source frame q, placed as ``Mosaic._mosaic4`` places
    it: content pixel ``(x, y)`` lands on canvas pixel ``(x + padx, y + pady)``.
    Without mosaic the stored frame of source 0 is the canvas (every quadrant).

    Returns a dict of ``(B, 4)`` int32 arrays: ``offx, offy`` (canvas minus
    frame coordinates), ``x_lo, x_hi, y_lo, y_hi`` (the tile's canvas pixels,
    clipped to the canvas), ``base`` (flat index of canvas pixel (0, 0) in the
    ``(K*S*S,)`` source pixels), and ``(B, 1)`` ``xc, yc`` (quadrant split).
    """
    b, k = rects.shape[:2]
    top, left, h, w = (rects[..., i] for i in range(4))  # (B, K)
    xc, yc = params.center[:, 0:1], params.center[:, 1:2]
    canvas = jnp.where(params.mosaic, 2 * size, size)[:, None]
    if k == 4:
        mos = params.mosaic[:, None]
        padx = jnp.concatenate([xc - w[:, 0:1], xc, xc - w[:, 2:3], xc], 1)  # padw = x1a - x1b
        pady = jnp.concatenate([yc - h[:, 0:1], yc - h[:, 1:2], yc, yc], 1)  # padh = y1a - y1b
        src = jnp.where(mos, jnp.arange(4, dtype=jnp.int32)[None], 0)
        offx, offy = jnp.where(mos, padx - left, 0), jnp.where(mos, pady - top, 0)
        x_lo, y_lo = jnp.where(mos, jnp.maximum(padx, 0), 0), jnp.where(mos, jnp.maximum(pady, 0), 0)
        x_hi = jnp.where(mos, jnp.minimum(padx + w, canvas), size)
        y_hi = jnp.where(mos, jnp.minimum(pady + h, canvas), size)
        xc, yc = jnp.where(mos, xc, 0), jnp.where(mos, yc, 0)
    else:  # K = 1: the stored frame is the canvas
        src = offx = offy = x_lo = y_lo = jnp.zeros((b, 4), jnp.int32)
        x_hi = y_hi = jnp.full((b, 4), size, jnp.int32)
        xc = yc = jnp.zeros((b, 1), jnp.int32)
    base = src * (size * size) - offy * size - offx
    return dict(offx=offx, offy=offy, x_lo=x_lo, x_hi=x_hi, y_lo=y_lo, y_hi=y_hi, base=base, xc=xc, yc=yc)


def _pick(table, q):
    """``table[b, q[b, p]]`` for a ``(B, 4)`` table, as selects."""
    t = [table[:, i : i + 1] for i in range(4)]
    return jnp.where(q < 2, jnp.where(q == 0, t[0], t[1]), jnp.where(q == 2, t[2], t[3]))


def _canvas_index(tile, X, Y, size: int, fill: int):
    """Where the canvas pixels at integer ``X, Y`` ``(B, P)`` are in the
    packed source pixels (:func:`_warp_images`): ``(B, P)`` int32, ``fill``
    (the index of the 114 fill pixel) outside the tiles.  Resolving
    "outside" in the index keeps the per-channel blend free of the tile
    arithmetic (XLA would otherwise redo it per channel)."""
    q = (X >= tile["xc"]).astype(jnp.int32) + 2 * (Y >= tile["yc"]).astype(jnp.int32)
    inside = (X >= _pick(tile["x_lo"], q)) & (X < _pick(tile["x_hi"], q)) & (Y >= _pick(tile["y_lo"], q)) & (Y < _pick(tile["y_hi"], q))
    return jnp.where(inside, _pick(tile["base"], q) + Y * size + X, fill)


def _in_loop(fn, args, batch: int):
    """``fn(*args)`` (arrays with a leading batch axis ``batch``) computed in
    a two-iteration loop over halves of the batch, so that its outputs are
    materialised: XLA:CPU fuses elementwise producers into their consumers and
    drops optimization barriers before fusing, and fused into a gather, the
    index arithmetic runs in the gather's scalar loop, once per element
    (8 ms per bilinear tap at B 16, 128 px with mosaic, against ~1 ms as a
    vectorised pass).  A loop body is its own computation."""
    return jax.lax.map(lambda a: fn(*a), args, batch_size=max(1, -(-batch // 2)))


def _inverse(M, perspective: bool):
    """``(B, 3, 3)`` inverse of canvas->output; analytic for an affine M."""
    if perspective:
        return jnp.linalg.inv(M)
    a, b, c, d = M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1]
    tx, ty = M[:, 0, 2], M[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    row0 = jnp.stack([ia, ib, -(ia * tx + ib * ty)], -1)
    row1 = jnp.stack([ic, id_, -(ic * tx + id_ * ty)], -1)
    row2 = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0], M.dtype), row0.shape)
    return jnp.stack([row0, row1, row2], 1)


def _warp_images(images, rects, params: AugmentParams, size: int, perspective: bool):
    """Mosaic + warp as one inverse-mapped bilinear sample: ``(B, S, S, 3)`` uint8."""
    b, k = images.shape[:2]
    px = images.reshape(b, k * size * size, 3).astype(jnp.uint32)
    packed = px[..., 0] | (px[..., 1] << 8) | (px[..., 2] << 16)  # one gather per tap instead of three
    fill = jnp.full((b, 1), PAD_VALUE * 0x010101, jnp.uint32)
    packed = jnp.concatenate([packed, fill], axis=1)
    tile = _tiles(rects, params, size)
    Minv = _inverse(params.matrix, perspective)
    ys, xs = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing="ij")
    x, y = xs.reshape(1, -1), ys.reshape(1, -1)
    # The flips (after HSV upstream, which is per pixel, so they commute) read mirrored output pixels.
    last = float(size - 1)
    x = jnp.where(params.fliplr[:, None], last - x, x)
    y = jnp.where(params.flipud[:, None], last - y, y)
    m = lambda i, j: Minv[:, i, j][:, None]  # noqa: E731
    sx = x * m(0, 0) + y * m(0, 1) + m(0, 2)
    sy = x * m(1, 0) + y * m(1, 1) + m(1, 2)
    if perspective:
        wz = x * m(2, 0) + y * m(2, 1) + m(2, 2)
        sx, sy = sx / wz, sy / wz
    # Far-away points read only border taps; clamping keeps the int conversion finite.
    lim = 2.0 * size + 4.0
    sx, sy = jnp.clip(jnp.nan_to_num(sx, nan=-lim), -lim, lim), jnp.clip(jnp.nan_to_num(sy, nan=-lim), -lim, lim)
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    X0, Y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    fill = packed.shape[1] - 1

    def indices(tile, X0, Y0):  # one image: the four taps' (4 P,) source indices
        tile = {k: v[None] for k, v in tile.items()}
        taps = [_canvas_index(tile, X0[None] + dx, Y0[None] + dy, size, fill) for dy in (0, 1) for dx in (0, 1)]
        return jnp.concatenate(taps, axis=1)[0]

    idx = _in_loop(indices, (tile, X0, Y0), b)  # (B, 4 P): taps (0, 0), (1, 0), (0, 1), (1, 1)
    words = jnp.take_along_axis(packed, idx, axis=1, mode="clip").reshape(b, 4, -1)
    shifts = jnp.asarray([0, 8, 16], jnp.uint32)
    p00, p01, p10, p11 = (((words[:, t, :, None] >> shifts) & 255).astype(jnp.float32) for t in range(4))  # (B, P, 3)
    v0 = p00 + fx * (p01 - p00)
    v1 = p10 + fx * (p11 - p10)
    v = v0 + fy * (v1 - v0)
    return jnp.clip(jnp.round(v), 0, 255).astype(jnp.uint8).reshape(b, size, size, 3)


def box_candidates(box1, box2, *, wh_thr: float = 2.0, ar_thr: float = 100.0, area_thr: float = 0.1, eps: float = 1e-16):
    """Upstream's ``RandomPerspective.box_candidates`` on ``(..., 4)`` xyxy boxes.

    Args:
      box1: ``(..., 4)`` xyxy pixels before augmentation (scaled by the drawn scale).
      box2: ``(..., 4)`` xyxy pixels after augmentation.

    Returns:
      ``(...)`` bool: width and height ``> wh_thr``, area ratio ``> area_thr``,
      aspect ratio ``< ar_thr``.
    """
    w1, h1 = box1[..., 2] - box1[..., 0], box1[..., 3] - box1[..., 1]
    w2, h2 = box2[..., 2] - box2[..., 0], box2[..., 3] - box2[..., 1]
    ar = jnp.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def _warp_boxes(targets: Targets, rects, params: AugmentParams, size: int, perspective: bool):
    """Boxes through mosaic and the warp: ``(xyxy (B, K*M, 4) output pixels, keep (B, K*M))``."""
    b, k, m = targets.mask.shape
    s = float(size)
    boxes = targets.boxes.astype(jnp.float32) * s  # (B, K, M, 4) cxcywh, frame pixels
    xyxy = jnp.concatenate([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    tile = _tiles(rects, params, size)
    # frame pixels -> canvas pixels (tile q = source q); single image: the frame is the canvas
    off_x = tile["offx"].astype(jnp.float32)[:, :k, None]
    off_y = tile["offy"].astype(jnp.float32)[:, :k, None]
    canvas = jnp.where(params.mosaic, 2.0 * s, s)[:, None, None, None]
    xyxy = xyxy + jnp.stack([off_x, off_y, off_x, off_y], -1)
    xyxy = jnp.clip(xyxy, 0.0, canvas)  # Mosaic._cat_labels: clip to the canvas ...
    valid = targets.mask & ((xyxy[..., 2] - xyxy[..., 0]) * (xyxy[..., 3] - xyxy[..., 1]) > 0)  # ... drop zero area
    src = jnp.arange(k)[None, :, None]
    valid = valid & (params.mosaic[:, None, None] | (src == 0))  # without mosaic only image 0 counts
    xyxy, valid = xyxy.reshape(b, k * m, 4), valid.reshape(b, k * m)
    # RandomPerspective.apply_bboxes: the 4 corners x1y1, x2y2, x1y2, x2y1 through M.
    cx = jnp.stack([xyxy[..., 0], xyxy[..., 2], xyxy[..., 0], xyxy[..., 2]], -1)
    cy = jnp.stack([xyxy[..., 1], xyxy[..., 3], xyxy[..., 3], xyxy[..., 1]], -1)
    M = params.matrix[:, None, None]  # (B, 1, 1, 3, 3)
    tx = cx * M[..., 0, 0] + cy * M[..., 0, 1] + M[..., 0, 2]
    ty = cx * M[..., 1, 0] + cy * M[..., 1, 1] + M[..., 1, 2]
    if perspective:
        tw = cx * M[..., 2, 0] + cy * M[..., 2, 1] + M[..., 2, 2]
        tw = jnp.where(tw == 0, 1e-12, tw)
        tx, ty = tx / tw, ty / tw
    new = jnp.stack([tx.min(-1), ty.min(-1), tx.max(-1), ty.max(-1)], -1)
    new = jnp.clip(new, 0.0, s)  # Instances.clip(w, h)
    keep = valid & box_candidates(xyxy * params.scale[:, None, None], new)
    return new, keep


# --------------------------------------------------------------------- HSV


@functools.cache
def _hsv_tables():
    """Host-built constants for OpenCV's uint8 HSV conversions.

    ``sdiv, hdiv (256,)`` int32: RGB2HSV_b's fixed-point reciprocals.
    ``vv (256,)`` float32: ``V * (1/255)``.
    ``factors (256, 256, 3)`` float32: for hue H and saturation S, the factor
    of ``v`` that HSV2RGB_b's SIMD kernel gives each of R, G, B:
    ``1``, ``1 - s``, ``fma(-s, f, 1)`` or ``fma(-s, 1 - f, 1)`` with
    ``f`` the hue's fractional sector (the FMA rounding emulated in float64).
    """
    i = np.arange(1, 256, dtype=np.float64)
    sdiv = np.zeros(256, np.int32)
    hdiv = np.zeros(256, np.int32)
    sdiv[1:] = np.rint((255 << 12) / i)
    hdiv[1:] = np.rint((180 << 12) / (6.0 * i))
    f32 = np.float32
    vv = np.arange(256, dtype=f32) * (f32(1.0) / f32(255.0))
    H = np.arange(256, dtype=f32)[:, None]
    s = (np.arange(256, dtype=f32) * (f32(1.0) / f32(255.0)))[None, :]
    hh = H * (f32(6.0) / f32(180.0))
    pre = np.trunc(hh)
    frac = hh - pre
    one = f32(1.0)

    def fnma(a, b):  # 1 - a * b with a single rounding, as an FMA
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)

    tab = np.stack(np.broadcast_arrays(np.ones_like(s), one - s, fnma(s, frac), fnma(s, one - frac)), -1)  # (256, 256, 4)
    sector = (pre - np.trunc(pre * (f32(1.0) / f32(6.0))) * f32(6.0)).astype(np.int64)[:, 0]
    # HSV2RGB_simd: which of tab[0..3] each of (r, g, b) takes in each sector.
    pick = np.asarray([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    factors = np.take_along_axis(tab, pick[sector][:, None, :].repeat(256, 1), axis=-1)
    return sdiv, hdiv, vv, factors.astype(f32)


def _rgb_to_hsv(rgb):
    """cv2 ``COLOR_RGB2HSV`` on uint8: ``(..., 3)`` int32 in -> H [0, 180], S, V."""
    sdiv, hdiv, _, _ = (jnp.asarray(t) for t in _hsv_tables())
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    diff = v - jnp.minimum(jnp.minimum(r, g), b)
    s = (diff * sdiv[v] + (1 << 11)) >> 12
    h = jnp.where(v == r, g - b, jnp.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + (1 << 11)) >> 12
    return jnp.where(h < 0, h + 180, h), s, v


def hsv_augment(images, gains):
    """``RandomHSV`` with given gains.

    Args:
      images: ``(B, H, W, 3)`` uint8 RGB.
      gains: ``(B, 3)`` float32 ``r`` (upstream's ``uniform(-1, 1, 3) * [hgain, sgain, vgain]``).

    Returns:
      ``(B, H, W, 3)`` uint8.
    """
    _, _, vv, factors = (jnp.asarray(t) for t in _hsv_tables())
    b = images.shape[0]

    def new_hsv(rgb, r):  # one image: (P, 3) uint8, (3,) gains -> H, S, V (P,) int32 through cv2.LUT
        x = jnp.arange(256, dtype=jnp.float32)
        lut_h = jnp.floor(jnp.mod(x + r[0] * 180.0, 180.0)).astype(jnp.int32)
        lut_s = jnp.clip(x * (r[1] + 1.0), 0.0, 255.0).astype(jnp.int32).at[0].set(0)
        lut_v = jnp.clip(x * (r[2] + 1.0), 0.0, 255.0).astype(jnp.int32)
        h, s, v = _rgb_to_hsv(rgb.astype(jnp.int32))
        return lut_h[h], lut_s[s], lut_v[v]

    # H, S, V materialised (a loop, :func:`_in_loop`): fused into the (P, 3)
    # output's table lookups, XLA:CPU recomputed the whole chain of lookups in
    # the gathers' scalar loops, once per channel (the augmentation at B 16,
    # 128 px: 17-19 -> 14-15 ms, bit-identical).
    h, s, v = _in_loop(new_hsv, (images.reshape(b, -1, 3), gains.astype(jnp.float32)), b)
    f = factors[h, s]  # (B, P, 3)
    out = jnp.trunc((vv[v][..., None] * f) * 255.0)
    return jnp.clip(out, 0, 255).astype(jnp.uint8).reshape(images.shape)


# ------------------------------------------------------------------ compose


def _compact(xyxy, classes, keep, size: int, max_boxes: int):
    """Survivors to the front (stable), ``max_boxes`` slots: ``(Targets, dropped (B,))``."""
    b, n = keep.shape
    order = jnp.argsort(~keep, axis=1, stable=True)
    if n < max_boxes:
        order = jnp.concatenate([order, jnp.zeros((b, max_boxes - n), order.dtype)], 1)
    order = order[:, :max_boxes]
    mask = jnp.take_along_axis(keep, order, 1) & (jnp.arange(max_boxes) < n)[None]
    box = jnp.take_along_axis(xyxy, order[..., None], 1) / float(size)
    cxcywh = jnp.concatenate([(box[..., :2] + box[..., 2:]) / 2, box[..., 2:] - box[..., :2]], -1)
    cls = jnp.take_along_axis(classes, order, 1)
    dropped = jnp.maximum(keep.sum(1) - max_boxes, 0).astype(jnp.int32)
    return Targets(jnp.where(mask[..., None], cxcywh, 0.0), jnp.where(mask, cls, 0).astype(jnp.int32), mask), dropped


def _check(images, rects, targets, config: AugmentConfig):
    if images.ndim != 5 or images.shape[-1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (B, K, S, S, 3) uint8, got {tuple(images.shape)}")
    if images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    b, k = images.shape[:2]
    if k not in (1, 4):
        raise ValueError(f"images must hold K = 4 (mosaic) or K = 1 sources per output, got K = {k}")
    if config.mosaic > 0 and k != 4:
        raise ValueError(f"AugmentConfig.mosaic = {config.mosaic} needs K = 4 source images per output, got K = {k}")
    if tuple(rects.shape) != (b, k, 4):
        raise ValueError(f"rects must be (B, K, 4) = {(b, k, 4)} int32 [top, left, h, w], got {tuple(rects.shape)}")
    if targets.boxes.ndim != 4 or tuple(targets.boxes.shape[:2]) != (b, k) or targets.boxes.shape[-1] != 4:
        raise ValueError(f"targets.boxes must be (B, K, M, 4) with (B, K) = {(b, k)}, got {tuple(targets.boxes.shape)}")
    if targets.mask.shape != targets.boxes.shape[:3] or targets.classes.shape != targets.boxes.shape[:3]:
        raise ValueError("targets.classes and targets.mask must be (B, K, M) like targets.boxes")


def apply_augment(params: AugmentParams, images, rects, targets: Targets, *, config: AugmentConfig, max_boxes: int):
    """The augmentations with given parameters (see the module docstring for shapes).

    Args:
      params: from :func:`sample_params` / :func:`params_from_uniform`, or by hand.
      images: ``(B, K, S, S, 3)`` uint8.
      rects: ``(B, K, 4)`` int32 ``[top, left, h, w]``.
      targets: ``Targets`` with ``(B, K, M)`` leading dims, boxes normalised
        cxcywh of the S x S frames.
      config: only which stages run is read from it (zero strengths skip
        the HSV and perspective code paths).
      max_boxes: M_out, the output's padded number of boxes.

    Returns:
      ``(images (B, S, S, 3) uint8, Targets (B, M_out), dropped (B,) int32)``.
    """
    _check(images, rects, targets, config)
    size = images.shape[2]
    rects = rects.astype(jnp.int32)
    perspective = config.perspective > 0
    params = params._replace(flipud=params.flipud & (config.flipud > 0), fliplr=params.fliplr & (config.fliplr > 0))
    out = _warp_images(images, rects, params, size, perspective)  # flips included
    xyxy, keep = _warp_boxes(targets, rects, params, size, perspective)
    if config.hsv_h or config.hsv_s or config.hsv_v:
        out = hsv_augment(out, params.hsv)
    s = float(size)
    fy = jnp.stack([xyxy[..., 0], s - xyxy[..., 3], xyxy[..., 2], s - xyxy[..., 1]], -1)
    xyxy = jnp.where(params.flipud[:, None, None], fy, xyxy)
    fx = jnp.stack([s - xyxy[..., 2], xyxy[..., 1], s - xyxy[..., 0], xyxy[..., 3]], -1)
    xyxy = jnp.where(params.fliplr[:, None, None], fx, xyxy)
    classes = targets.classes.reshape(keep.shape).astype(jnp.int32)
    new_targets, dropped = _compact(xyxy, classes, keep, size, max_boxes)
    return out, new_targets, dropped


def pad_to_mosaic(batch: dict) -> dict:
    """A K = 1 training batch as a K = 4 one without mosaic partners.

    ``batch``: the pipeline's dict, ``image (B, 1, S, S, 3)``, ``rects (B, 1,
    4)``, ``boxes (B, 1, M, 4)``, ``classes (B, 1, M)``, ``mask (B, 1, M)``
    (other entries pass through).  Frames 1-3 are zeros with empty content
    rectangles and no boxes, so :func:`augment` mosaics none of the images and
    returns what it returns for the K = 1 batch, bit for bit.  The trainer
    pads its epochs without mosaic (``close_mosaic``) this way: the train
    step it compiled for the mosaic epochs runs them, instead of a second
    compile (26 s of the main command's 7 minutes on a 2-core CPU)."""
    k = batch["image"].shape[1]
    if k != 1:
        raise ValueError(f"pad_to_mosaic takes a K = 1 batch (image (B, 1, S, S, 3)), got image {tuple(batch['image'].shape)}")
    out = dict(batch)
    for name in ("image", "rects", "boxes", "classes", "mask"):
        a = batch[name]
        out[name] = jnp.concatenate([a, jnp.zeros((a.shape[0], 3, *a.shape[2:]), a.dtype)], axis=1)
    return out


def augment(key, images, rects, targets: Targets, *, config: AugmentConfig = AugmentConfig(), max_boxes: int):
    """Draw the parameters from ``key`` and apply mosaic -> affine -> HSV -> flips.

    ``config`` and ``max_boxes`` are static (close over them or mark them
    static under ``jax.jit``); shapes as in :func:`apply_augment`.
    """
    _check(images, rects, targets, config)
    params = sample_params(key, jnp.asarray(rects, jnp.int32), config=config, size=images.shape[2])
    return apply_augment(params, images, rects, targets, config=config, max_boxes=max_boxes)
