"""The embedded dataset: procedurally drawn shapes, deterministic, no download.

Every image is a function of ``(seed, index)`` alone: a noisy colour-gradient
background, clutter (thin lines and dots smaller than any object) and 0-9
objects of :data:`SHAPE_CLASSES`, log-uniform sizes from tiny (~8 px) to
large (60% of the side), random colours with contrast to the background,
random aspect ratios, and overlaps (IoU up to 0.2; later shapes paint over
earlier ones).  About 7% of the images hold no object.  Labels are YOLO
rows ``[class, cx, cy, w, h]`` normalised to ``[0, 1]``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["SHAPE_CLASSES", "render_shapes_image", "make_shapes_dataset"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "diamond", "ring")

_MAX_OBJECTS = 9
_EMPTY_FRACTION = 0.07


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter), inter / area(b)


def _draw(draw, cls: int, box, color):
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # PIL includes the end pixel: subtract 1 so the drawn extent is [x1, x2).
    ex, ey = x2 - 1, y2 - 1
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        draw.ellipse([x1, y1, ex, ey], fill=color)
    elif name == "square":
        draw.rectangle([x1, y1, ex, ey], fill=color)
    elif name == "triangle":
        draw.polygon([(cx, y1), (ex, ey), (x1, ey)], fill=color)
    elif name == "cross":
        t = max(w, h) * 0.16
        draw.rectangle([x1, cy - max(t, 1), ex, cy + max(t, 1)], fill=color)
        draw.rectangle([cx - max(t, 1), y1, cx + max(t, 1), ey], fill=color)
    elif name == "diamond":
        draw.polygon([(cx, y1), (ex, cy), (cx, ey), (x1, cy)], fill=color)
    elif name == "ring":
        draw.ellipse([x1, y1, ex, ey], outline=color, width=max(2, int(round(min(w, h) * 0.18))))


def render_shapes_image(seed: int, index: int, *, img_size: int = 128):
    """One image and its labels.

    Args:
      seed: dataset seed (train and val use different seeds).
      index: image index.
      img_size: side S in pixels.

    Returns:
      ``image (S, S, 3) uint8`` and ``labels (n, 5) float32`` rows
      ``[class, cx, cy, w, h]`` normalised, ``n`` in ``[0, 9]``.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    s = img_size
    # Background: a random colour gradient.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, s, dtype=np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None]) / 2 + 0.5
    bg = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # Clutter: thin lines and dots, smaller/thinner than any object.
    for _ in range(rng.integers(2, 8)):
        p = rng.uniform(0, s, 4)
        draw.line(list(p), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=1)
    for _ in range(rng.integers(0, 10)):
        x, y = rng.uniform(0, s, 2)
        r = rng.uniform(0.5, 1.5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))

    n = 0 if rng.uniform() < _EMPTY_FRACTION else int(rng.integers(1, _MAX_OBJECTS + 1))
    boxes, classes = [], []
    lo, hi = max(8.0, 0.06 * s), 0.6 * s
    for _ in range(n):
        for _attempt in range(30):
            size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            aspect = float(np.exp(rng.uniform(-0.3, 0.3)))
            w = int(round(min(size * np.sqrt(aspect), s)))
            h = int(round(min(size / np.sqrt(aspect), s)))
            x1 = int(rng.integers(0, s - w + 1))
            y1 = int(rng.integers(0, s - h + 1))
            box = (x1, y1, x1 + w, y1 + h)
            # Overlap allowed, but no box may hide more than half of an earlier one.
            if all(_iou(box, b)[0] <= 0.2 and _iou(box, b)[1] <= 0.5 for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(SHAPE_CLASSES)))
        region = np.asarray(img.crop((x1, y1, x1 + w, y1 + h)), np.float32).reshape(-1, 3).mean(0)
        for _c in range(20):  # a colour that stands out from the local background
            color = rng.integers(0, 256, 3)
            if np.abs(color - region).sum() > 180:
                break
        _draw(draw, cls, box, tuple(int(v) for v in color))
        boxes.append(box)
        classes.append(cls)

    arr = np.asarray(img, np.float32) + rng.normal(0, 6, (s, s, 3))
    image = np.clip(arr, 0, 255).astype(np.uint8)
    labels = np.zeros((len(boxes), 5), np.float32)
    for i, (b, c) in enumerate(zip(boxes, classes)):
        labels[i] = [c, (b[0] + b[2]) / 2 / s, (b[1] + b[3]) / 2 / s, (b[2] - b[0]) / s, (b[3] - b[1]) / s]
    return image, labels


def make_shapes_dataset(n: int, *, seed: int, img_size: int = 128, workers: int | None = None):
    """``n`` images: ``images (n, S, S, 3) uint8`` and a list of ``(n_i, 5)`` label arrays.

    Rendered by ``workers`` threads (default: one per CPU; numpy and PIL
    release the GIL for most of the work: 1.6x faster on 2 cores).  Each
    image is a function of ``(seed, index)`` alone, so the result does not
    depend on ``workers``."""
    images = np.zeros((n, img_size, img_size, 3), np.uint8)
    labels = [None] * n

    def render(i):
        images[i], labels[i] = render_shapes_image(seed, i, img_size=img_size)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="jaxyolo-shapes") as ex:
        for _ in ex.map(render, range(n)):  # re-raises a worker's exception
            pass
    return images, labels
