"""One image file -> one letterboxed frame; also the decode worker process.

This module imports numpy, Pillow and OpenCV only (never jax), so that the
decode worker processes of :mod:`jaxyolo.data.stream` start in a fraction of a
second and hold ~50 MB each.

Every image becomes one ``(S, S, 3)`` uint8 RGB buffer, exactly the image
ultralytics trains on and validates with (8.4.190, checked pixel for pixel in
the tests):

1. decode with Pillow, EXIF orientation applied (``ImageOps.exif_transpose``,
   as ``cv2.imread`` does), any mode converted to RGB (grayscale replicated,
   alpha dropped as ``cv2.IMREAD_COLOR`` drops it, palette expanded, 16-bit
   reduced to its high byte like OpenCV).  On JPEGs Pillow's decode equals
   ``cv2.imread`` (same libjpeg-turbo output, checked on the bundled
   ``bus.jpg``/``zidane.jpg``);
2. ``BaseDataset.load_image``: resize so the long side is S, the short side
   ``min(ceil(side * S / long), S)``, with ``cv2.resize(INTER_LINEAR)``.  We
   resize with OpenCV, not Pillow: Pillow's bilinear filter antialiases when
   shrinking, so its pixels differ from upstream's by tens of levels;
3. ``LetterBox(auto=False, center=True)``: centre that image in the S x S
   frame, padding with 114.  The un-padded area is the image's *content
   rectangle* ``[top, left, h, w]`` (mosaic tiles use it, and predictions map
   back through it).  ``top = (S - h) // 2``, ``left = (S - w) // 2``
   (upstream's ``round(d / 2 - 0.1)``).

Labels ``(n, 5)`` normalised to the original image become normalised to the
S x S frame: ``cx' = (cx * w + left) / S``, ``w' = w_box * w / S``.

Labels ``(n, 5)`` normalised to the original image become normalised to the
S x S frame: ``cx' = (cx * w + left) / S``, ``w' = w_box * w / S``
(:func:`letterbox_boxes`).
"""

from __future__ import annotations

import math
import os
import pickle
import sys

import numpy as np

__all__ = ["PAD_VALUE", "MIN_SIDE", "decode_image", "letterbox", "letterbox_rect", "letterbox_boxes", "decode_into", "failure_reason", "image_size", "run_task", "serve"]

PAD_VALUE = 114  # upstream's letterbox / mosaic / warp fill
MIN_SIDE = 10  # ultralytics check_image: smaller images are corrupt


def decode_image(path) -> np.ndarray:
    """Decode one image file.

    Returns:
      ``(h, w, 3)`` uint8 RGB, EXIF orientation applied.

    Raises:
      OSError / ValueError (whatever Pillow raises) for unreadable files.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of the decoded image
        except Exception:  # a broken EXIF block: decode as stored, like cv2 does
            pass
        if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit: the high byte, as cv2.IMREAD_COLOR
            a = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        elif im.mode == "F":
            a = np.asarray(im).clip(0, 255).astype(np.uint8)
        else:
            a = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a


def letterbox_rect(h0: int, w0: int, size: int) -> np.ndarray:
    """``(4,) int32 [top, left, h, w]``: where an ``h0 x w0`` image lies in its
    S x S letterboxed frame (the long side resized to S, centred)."""
    r = size / max(h0, w0)
    h, w = (min(math.ceil(h0 * r), size), min(math.ceil(w0 * r), size)) if r != 1 else (h0, w0)
    return np.asarray([(size - h) // 2, (size - w) // 2, h, w], np.int32)  # == upstream round((size - h) / 2 - 0.1)


def letterbox(image: np.ndarray, size: int, out: np.ndarray | None = None):
    """Upstream's ``load_image`` resize + ``LetterBox(auto=False, center=True)``.

    Args:
      image: ``(h0, w0, 3)`` uint8.
      size: S.
      out: optional ``(S, S, 3)`` uint8 buffer to write into.

    Returns:
      ``(frame (S, S, 3) uint8, rect (4,) int32 [top, left, h, w])``: the
      letterboxed image and where the resized image lies in it.
    """
    import cv2

    rect = letterbox_rect(*image.shape[:2], size)
    top, left, h, w = (int(v) for v in rect)
    if (h, w) != image.shape[:2]:
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    out[:top], out[top + h :] = PAD_VALUE, PAD_VALUE
    out[top : top + h, :left], out[top : top + h, left + w :] = PAD_VALUE, PAD_VALUE
    out[top : top + h, left : left + w] = image
    return out, rect


def letterbox_boxes(boxes: np.ndarray, rects: np.ndarray, size: int) -> np.ndarray:
    """Boxes of original images -> boxes of their letterboxed frames.

    Args:
      boxes: ``(..., 4)`` float32 cxcywh normalised to the original image.
      rects: ``(..., 4)`` int ``[top, left, h, w]`` content rectangles in the
        S x S frames (pixels), broadcast against ``boxes``.
      size: S.

    Returns:
      ``(..., 4)`` float32 cxcywh normalised to the S x S frame.
    """
    rects = np.asarray(rects)
    top, left, h, w = (rects[..., i].astype(np.float32) for i in range(4))
    boxes = np.asarray(boxes, np.float32)
    out = np.empty(np.broadcast_shapes(boxes.shape, rects.shape), np.float32)
    s = np.float32(size)
    out[..., 0] = (boxes[..., 0] * w + left) / s
    out[..., 1] = (boxes[..., 1] * h + top) / s
    # the scale is rounded to float32 once, then multiplied (as a float32 array times a Python float)
    out[..., 2] = boxes[..., 2] * (rects[..., 3] / size).astype(np.float32)
    out[..., 3] = boxes[..., 3] * (rects[..., 2] / size).astype(np.float32)
    return out


def decode_into(path, size: int, out: np.ndarray, declared=None):
    """Decode + letterbox ``path`` into ``out (S, S, 3)`` uint8.

    Args:
      declared: optional ``[h, w]`` the image must have (a COCO entry's).

    Returns:
      ``(original image (h, w, 3) uint8, rect (4,) int32 [top, left, h, w])``.

    Raises:
      whatever Pillow raises for an unreadable file; ValueError for an image
      smaller than :data:`MIN_SIDE` or of another size than ``declared``.
    """
    image = decode_image(path)
    h0, w0 = image.shape[:2]
    if h0 < MIN_SIDE or w0 < MIN_SIDE:
        raise ValueError(f"image size {w0}x{h0} < {MIN_SIDE} pixels")
    if declared is not None and (h0, w0) != tuple(int(v) for v in declared):
        raise ValueError(f"size {w0}x{h0} differs from the annotation's {int(declared[1])}x{int(declared[0])}")
    _, rect = letterbox(image, size, out=out)
    return image, rect


def failure_reason(e: BaseException, path) -> str:
    """A short one-line reason for a failed decode, without the path itself."""
    p = os.fspath(path)
    reason = str(e).replace(f"'{p}'", "").replace(p, "")
    return " ".join(f"{type(e).__name__}: {reason}".split())


def image_size(path) -> tuple:
    """``(h, w)`` of an image file after its EXIF orientation, from the
    header only (no pixel decode); what :func:`decode_image` will return."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: decode_image decodes as stored
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# ----------------------------------------------------------------- worker
#
# A decode worker is a plain interpreter running serve(): it reads pickled
# tasks on stdin and answers each with one pickled reply on stdout.


def run_task(task, buffers: dict):
    """Run one task ``(buffer, rows, row, path, declared, size)``: decode
    ``path`` into row ``row`` of the raw uint8 file ``buffer`` of shape
    ``(rows, size, size, 3)`` (memory-mapped once into ``buffers``).  Returns
    the reply ``("ok", rect, (h0, w0))`` or ``("err", reason)``: an
    unreadable file is a reply, not an exception.  A buffer this process
    cannot open is ``("fatal", reason)``: no image could be decoded."""
    buf_path, rows, row, path, declared, size = task
    buf = buffers.get((buf_path, rows, size))
    if buf is None:
        try:
            buf = buffers[(buf_path, rows, size)] = np.memmap(buf_path, np.uint8, "r+", shape=(rows, size, size, 3))
        except Exception as e:
            return ("fatal", f"cannot open the shared frame buffer {buf_path}: {type(e).__name__}: {e}")
    try:
        image, rect = decode_into(path, size, buf[row], declared)
        return ("ok", tuple(int(v) for v in rect), image.shape[:2])
    except Exception as e:
        return ("err", failure_reason(e, path))


def serve(inp=None, out=None) -> None:
    """The worker loop: :func:`run_task` for each task on stdin, until it closes.

    As a worker process (``out`` None) it ignores SIGINT and SIGTERM: Ctrl-C
    reaches the whole foreground process group, and a preempted VM's
    shutdown signals every process, but the trainer stops at a step boundary
    (:mod:`jaxyolo.train.preempt`) and needs its decodes until then.  The
    worker ends when the trainer closes its stdin, or dies (EOF)."""
    if out is None:  # keep fd 1 for replies; stray prints from libraries go to stderr
        import signal

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        out = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
    inp = inp or sys.stdin.buffer
    try:
        import cv2

        cv2.setNumThreads(1)  # one image per process: no oversubscription
    except Exception:
        pass
    buffers = {}
    while True:
        try:
            task = pickle.load(inp)
        except EOFError:
            return
        pickle.dump(run_task(task, buffers), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    serve()
