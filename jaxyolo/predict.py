"""Run a detector on image files: the pure pieces behind ``jaxyolo predict``.

* :func:`list_images`: SOURCE (an image or a folder; a folder's images
  directly inside it, sorted, as upstream's ``LoadImagesAndVideos``) -> paths.
* :func:`iter_predictions` / :func:`predict_paths`: decode and letterbox
  exactly as for training (:mod:`jaxyolo.data.images`), run ``predict_fn`` on
  static-size batches, map the boxes back to each original image.
* :func:`draw_detections`: boxes, class names and scores drawn with Pillow,
  one fixed colour per class (ultralytics' palette), the label on a filled
  background in black or white, whichever reads better.
* :func:`yolo_txt_lines`: upstream's ``Results.save_txt(save_conf=True)``
  lines ``cls cx cy w h conf`` (``%g``), normalised to the original image.
* :func:`save_prediction`: the annotated image into ``out/`` (same file name)
  and, with ``save_txt``, ``out/labels/<stem>.txt`` (no file when nothing
  was detected, as upstream).

``predict_fn(images)`` takes ``(B, S, S, 3)`` uint8 letterboxed frames and
returns the batched NMS layout of :func:`jaxyolo.evaluate.batched_nms`:
``boxes (B, D, 4)`` xyxy pixels of the S x S frame, ``scores (B, D)``,
``classes (B, D)`` int, ``valid (B, D)`` bool.  :func:`nms_predict_fn` builds
one from a raw ``images -> (boxes (B, A, 4), scores (B, A, nc))`` decoder.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from jaxyolo.data.formats import IMG_FORMATS, DataError
from jaxyolo.data.images import PAD_VALUE, print_warning, read_images, skip_message

__all__ = [
    "PALETTE",
    "Detections",
    "draw_detections",
    "font_size",
    "iter_predictions",
    "line_width",
    "list_images",
    "nms_predict_fn",
    "place_labels",
    "predict_paths",
    "save_prediction",
    "unletterbox_boxes",
    "yolo_txt_lines",
]

# ultralytics.utils.plotting.Colors (RGB): class i gets PALETTE[i % 20].
PALETTE = tuple(
    tuple(int(h[i : i + 2], 16) for i in (0, 2, 4))
    for h in (
        "042AFF", "0BDBEB", "F3F3F3", "00DFB7", "111F68", "FF6FDD", "FF444F", "CCED00", "00F344", "BD00FF",
        "00B4FF", "DD00BA", "00FFFF", "26C000", "01FFB3", "7D24FF", "7B0068", "FF1B6C", "FC6D2F", "A2FF0B",
    )
)


@dataclasses.dataclass(frozen=True)
class Detections:
    """The detections of one image, in its original pixels.

    Attributes:
      path: the image file.
      orig_shape: ``(h, w)`` of the original image.
      boxes: ``(n, 4)`` float32 xyxy pixels of the original image, clipped to it.
      scores: ``(n,)`` float32, descending.
      classes: ``(n,)`` int32.
    """

    path: Path
    orig_shape: tuple
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self):
        return len(self.scores)


def list_images(source) -> list:
    """An image file, or a folder's images (not recursive), sorted.

    Raises:
      DataError: ``source`` does not exist, is not an image, or holds none.
    """
    p = Path(source)
    if p.is_file():
        if p.suffix[1:].lower() not in IMG_FORMATS:
            raise DataError(f"{p} is not an image ({', '.join(sorted(IMG_FORMATS))})")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix[1:].lower() in IMG_FORMATS)
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMG_FORMATS))}) in {p}")
        return files
    raise DataError(f"{p} does not exist")


def unletterbox_boxes(boxes, rect, orig_shape) -> np.ndarray:
    """Frame pixels -> original-image pixels, through the letterbox.

    Args:
      boxes: ``(n, 4)`` xyxy pixels of the S x S frame.
      rect: ``[top, left, h, w]`` the resized image's place in the frame.
      orig_shape: ``(h0, w0)`` of the original image.

    Returns:
      ``(n, 4)`` float32 xyxy pixels of the original image, clipped to it
      (upstream's ``scale_boxes`` with our exact per-axis resize factors).
    """
    top, left, h, w = (float(v) for v in rect)
    h0, w0 = (float(v) for v in orig_shape)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.stack([(b[:, 0] - left) * w0 / w, (b[:, 1] - top) * h0 / h, (b[:, 2] - left) * w0 / w, (b[:, 3] - top) * h0 / h], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w0)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h0)
    return out.astype(np.float32)


def yolo_txt_lines(det: Detections) -> list:
    """``Results.save_txt(save_conf=True)`` lines: ``cls cx cy w h conf``,
    normalised to the original image, ``%g`` formatted."""
    h0, w0 = (np.float32(v) for v in det.orig_shape)
    b = det.boxes.astype(np.float32)  # float32 steps as upstream's Boxes.xywhn, so the digits agree
    xywh = np.stack([(b[:, 0] + b[:, 2]) / np.float32(2), (b[:, 1] + b[:, 3]) / np.float32(2), b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    xywhn = xywh / np.asarray([w0, h0, w0, h0], np.float32)
    return [("%g " * 6).rstrip() % (int(c), *x, float(s)) for c, x, s in zip(det.classes, xywhn, det.scores)]


def _text_color(rgb) -> tuple:
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def line_width(orig_shape) -> int:
    """Upstream's ``Annotator`` line width: ``max(round((h + w) / 2 * 0.003), 2)``."""
    return max(round(sum(orig_shape) / 2 * 0.003), 2)


def font_size(orig_shape) -> int:
    """The label font's size in px: upstream's ``Annotator`` (PIL)
    ``max(round((h + w) / 2 * 0.035), 12)``, capped at 8 % of the shorter
    side (at least 8 px; the cap binds only under 150 px), so that a label
    on a tiny image is not half its width: 10 px at 128 px."""
    up = max(round(sum(orig_shape) / 2 * 0.035), 12)
    return min(up, max(round(min(orig_shape) * 0.08), 8))


def place_labels(boxes, sizes, orig_shape) -> np.ndarray:
    """Where each box's label goes: ``(N, 4)`` int ``x1, y1, x2, y2`` (end exclusive).

    ``boxes`` ``(N, 4)`` pixel xyxy in placement order (the best box first),
    ``sizes`` ``(N, 2)`` each label's ``(width, height)`` in px,
    ``orig_shape`` ``(h, w)``.  A label starts at its box's left edge, above
    the box; where that would cover a label already placed it goes inside the
    box's top, then below the box, then inside its bottom; if all four cover
    one, the place covering the least.  Every place is moved into the image
    (upstream's ``Annotator`` shifts a label left at the right edge; a label
    wider than the image starts at 0)."""
    h, w = orig_shape
    placed = []
    for (x1, y1, x2, y2), (tw, th) in zip(np.asarray(boxes, np.int64).tolist(), np.asarray(sizes, np.int64).tolist()):
        x = min(max(x1, 0), max(w - tw, 0))
        spots = [(x, min(max(y, 0), max(h - th, 0))) for y in (y1 - th, y1, y2, y2 - th)]

        def covered(spot):
            sx, sy = spot
            return sum(max(0, min(sx + tw, b[2]) - max(sx, b[0])) * max(0, min(sy + th, b[3]) - max(sy, b[1])) for b in placed)

        sx, sy = next((sp for sp in spots if covered(sp) == 0), None) or min(spots, key=covered)
        placed.append((sx, sy, sx + tw, sy + th))
    return np.asarray(placed, np.int64).reshape(-1, 4)


def draw_detections(image: np.ndarray, det: Detections, names) -> np.ndarray:
    """Draw ``det`` on ``image``.

    Args:
      image: ``(h, w, 3)`` uint8 RGB original.
      det: its detections.
      names: class names (an id outside them is drawn as its number).

    Returns:
      ``(h, w, 3)`` uint8: box outlines ``line_width`` px wide inside the
      box's pixel bounds, in ``PALETTE[class % 20]``; a label ``"name 0.87"``
      in a :func:`font_size` font on a filled background of the same colour,
      inside the image, above the box unless that covers a better box's
      label (:func:`place_labels`).  The outlines are drawn first, then the
      labels over them; lower scores first, so the best stay on top.
    """
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(im)
    lw = line_width(det.orig_shape)
    pad = max(lw // 2, 1)  # text inset in its background
    try:
        font = ImageFont.load_default(size=font_size(det.orig_shape))
    except (OSError, TypeError, ValueError):  # Pillow without FreeType
        font = ImageFont.load_default()
    best_first = np.argsort(-det.scores, kind="stable")
    boxes = np.round(det.boxes).astype(np.int64)
    labels = [f"{names[c] if 0 <= c < len(names) else c} {float(s):.2f}" for c, s in zip(det.classes.tolist(), det.scores)]
    extents = [draw.textbbox((0, 0), label, font=font) for label in labels]
    sizes = [(r - l + 2 * pad, b - t + 2 * pad) for l, t, r, b in extents]
    spots = np.zeros((len(det), 4), np.int64)
    spots[best_first] = place_labels(boxes[best_first], np.asarray(sizes).reshape(-1, 2)[best_first], det.orig_shape)
    colors = [PALETTE[int(c) % len(PALETTE)] for c in det.classes]
    for i in best_first[::-1]:  # ascending score: the best drawn last, on top
        x1, y1, x2, y2 = boxes[i].tolist()
        x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)  # Pillow includes the end pixel
        draw.rectangle([x1, y1, x2, y2], outline=colors[i], width=lw)
    for i in best_first[::-1]:  # the labels over every outline
        color = colors[i]
        lx1, ly1, lx2, ly2 = spots[i].tolist()
        draw.rectangle([lx1, ly1, lx2 - 1, ly2 - 1], fill=color)
        draw.text((lx1 + pad - extents[i][0], ly1 + pad - extents[i][1]), labels[i], fill=_text_color(color), font=font)
    return np.asarray(im)


def nms_predict_fn(raw_fn, *, conf: float = 0.25, iou: float = 0.7, max_det: int = 300):
    """Wrap ``raw_fn(images) -> (boxes (B, A, 4) xyxy px, scores (B, A, nc))``
    with :func:`jaxyolo.evaluate.batched_nms` (upstream predict defaults:
    conf 0.25, IoU 0.7, 300 detections), jitted."""
    import jax

    from jaxyolo._xla import compiler_options
    from jaxyolo.evaluate import batched_nms

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def fn(images):
        boxes, scores = raw_fn(images)
        return batched_nms(boxes, scores, conf_thres=conf, iou_thres=iou, max_det=max_det)

    return fn


def iter_predictions(paths, predict_fn, *, img_size: int, conf: float = 0.25, batch_size: int = 8, workers=None, warn=None):
    """Yield ``(Detections, original image (h, w, 3) uint8)`` per readable path, in order.

    Args:
      paths: image files (e.g. from :func:`list_images`).
      predict_fn: see the module docstring; called on exactly ``batch_size``
        frames every time (the last batch padded with 114 frames).
      img_size: S, the training size.
      conf: keep detections with score ``> conf`` (on top of whatever
        threshold ``predict_fn`` applied).
      batch_size: B.
      workers: decoding threads.
      warn: ``callable(str)`` for the one skipped-images line.

    Raises:
      DataError when no path can be read (after the others were yielded: none).
    """
    warn = warn or print_warning
    paths = [Path(p) for p in paths]
    size, b = int(img_size), int(batch_size)
    frames = np.empty((b, size, size, 3), np.uint8)
    errors = {}
    for start in range(0, len(paths), b):
        chunk = paths[start : start + b]
        frames[:] = PAD_VALUE
        rects, shapes, errs, originals = read_images(chunk, size, frames, workers=workers, keep_originals=True)
        errors.update({start + i: r for i, r in errs.items()})
        ok = [i for i in range(len(chunk)) if i not in errs]
        if not ok:
            continue
        boxes, scores, classes, valid = (np.asarray(x) for x in predict_fn(frames))
        for i in ok:
            keep = valid[i] & (scores[i] > conf)
            det = Detections(
                chunk[i],
                tuple(int(v) for v in shapes[i]),
                unletterbox_boxes(boxes[i][keep], rects[i], shapes[i]),
                scores[i][keep].astype(np.float32),
                classes[i][keep].astype(np.int32),
            )
            yield det, originals[i]
    if errors:
        source = str(paths[0].parent) if len({p.parent for p in paths}) == 1 else "predict"
        if len(errors) == len(paths):
            raise DataError(skip_message(source, paths, errors, fatal=True))
        warn(skip_message(source, paths, errors))


def predict_paths(paths, predict_fn, *, img_size: int, conf: float = 0.25, batch_size: int = 8, workers=None, warn=None) -> list:
    """:func:`iter_predictions` without the images: a list of :class:`Detections`."""
    return [d for d, _ in iter_predictions(paths, predict_fn, img_size=img_size, conf=conf, batch_size=batch_size, workers=workers, warn=warn)]


def save_prediction(det: Detections, image: np.ndarray, out_dir, names, *, save_txt: bool = False) -> Path:
    """Write the annotated image to ``out_dir/<file name>`` (JPEG when
    Pillow cannot write the source format) and, with ``save_txt``, its YOLO
    txt to ``out_dir/labels/<stem>.txt``; returns the image path."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = Image.fromarray(draw_detections(image, det, names))
    target = out_dir / det.path.name
    try:
        drawn.save(target, **({"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg") else {}))
    except (KeyError, OSError, ValueError):
        target.unlink(missing_ok=True)
        target = target.with_suffix(".jpg")
        drawn.save(target, quality=95)
    lines = yolo_txt_lines(det)
    if save_txt and lines:
        (out_dir / "labels").mkdir(exist_ok=True)
        (out_dir / "labels" / f"{det.path.stem}.txt").write_text("".join(f"{s}\n" for s in lines))
    return target

