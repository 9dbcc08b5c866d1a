"""Decode, letterbox and cache the images of a dataset split.

Every image becomes one ``(S, S, 3)`` uint8 RGB buffer, exactly the image
ultralytics trains on and validates with (8.4.190, checked pixel for pixel in
the tests); the steps are in :mod:`jaxyolo.data.decode`.

A file that cannot be decoded, is smaller than 10 px on a side (upstream's
``check_image``), or whose size differs from the size its COCO entry declares,
is skipped; one warning line gives the count and the first few names
(upstream logs one line per file).  If every image fails it is a
:class:`~jaxyolo.data.DataError`.

Cache (``cache=path``): the letterboxed images go to ``path`` (an ``.npy``
file, ``(N, S, S, 3)`` uint8, memory-mapped when loaded) and a sidecar
``path.with_suffix('.meta.npz')`` holding the content rectangles, original
shapes, kept file names and a key: a hash of the cache version, S, and every
file's path, size and mtime (and the COCO-declared shapes).  A later load with
the same key decodes nothing; labels are recomputed from the label files
(cheap), so editing labels does not invalidate the images.  Writes are atomic
(temporary files renamed into place, sidecar last).
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxyolo.data.dataset import DetectionData
from jaxyolo.data.decode import PAD_VALUE, decode_image, decode_into, failure_reason, letterbox, letterbox_boxes
from jaxyolo.data.formats import DataError, SplitSpec, discover

__all__ = [
    "PAD_VALUE",
    "decode_image",
    "letterbox",
    "letterbox_labels",
    "load_dataset",
    "load_split",
    "read_images",
]

CACHE_VERSION = 1
_WARN_NAMES = 3


def print_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def letterbox_labels(labels: np.ndarray, rect, size: int) -> np.ndarray:
    """Labels ``(n, 5) [class, cx, cy, w, h]`` normalised to the original
    image -> the same rows with boxes normalised to its letterboxed S x S
    frame, ``rect`` its ``[top, left, h, w]`` (:func:`letterbox_boxes`)."""
    out = np.array(labels, np.float32, copy=True).reshape(-1, 5)
    out[:, 1:] = letterbox_boxes(out[:, 1:], np.asarray(rect)[None], size)
    return out


def read_images(paths, size: int, out: np.ndarray, *, declared=None, workers: int | None = None, keep_originals: bool = False):
    """Decode and letterbox ``paths`` into ``out`` with a thread pool (Pillow
    and OpenCV release the GIL).

    Args:
      paths: N image paths.
      size: S.
      out: ``(N, S, S, 3)`` uint8 (array or memmap), written in place.
      declared: optional ``(N, 2)`` ``[h, w]`` each image must have.
      workers: threads (default: the CPU count).
      keep_originals: also return the decoded originals.

    Returns:
      ``(rects (N, 4) int32, orig_shapes (N, 2) int32, errors)`` where
      ``errors`` maps the index of each failed image to a short reason; its
      rows of ``out``/``rects``/``orig_shapes`` are undefined.  With
      ``keep_originals``, a 4th item: the N original ``(h, w, 3)`` uint8
      images (None where failed).
    """
    n = len(paths)
    rects = np.zeros((n, 4), np.int32)
    shapes = np.zeros((n, 2), np.int32)
    originals = [None] * n
    errors = {}

    def work(i):
        try:
            image, rects[i] = decode_into(paths[i], size, out[i], None if declared is None else declared[i])
            shapes[i] = image.shape[:2]
            if keep_originals:
                originals[i] = image
        except Exception as e:  # Pillow raises many types for corrupt files
            errors[i] = failure_reason(e, paths[i])

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as ex:
        list(ex.map(work, range(n)))
    return (rects, shapes, errors, originals) if keep_originals else (rects, shapes, errors)


def skip_message(source: str, paths, errors: dict, *, fatal: bool = False) -> str:
    """The one warning line for unreadable images (``errors``: index -> reason)."""
    first = sorted(errors)[:_WARN_NAMES]
    shown = ", ".join(f"{Path(paths[i]).name} ({errors[i]})" for i in first)
    more = f", and {len(errors) - len(first)} more" if len(errors) > len(first) else ""
    head = "no image can be read; " if fatal else ""
    return f"{source}: {head}skipped {len(errors)} of {len(paths)} images that cannot be read: {shown}{more}"


# ------------------------------------------------------------------ cache


def _meta_path(cache: Path) -> Path:
    return cache.with_suffix(".meta.npz")


def _cache_key(spec: SplitSpec, size: int) -> str:
    h = hashlib.sha256(f"jaxyolo-images v{CACHE_VERSION} S={size}\n".encode())
    for f in spec.files:
        try:
            st = os.stat(f)
            h.update(f"{os.fspath(f)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.fspath(f)}\tmissing\n".encode())
    if spec.shapes is not None:
        h.update(np.ascontiguousarray(spec.shapes, np.int64).tobytes())
    return h.hexdigest()


def _read_cache(cache: Path, key: str, n_files: int, size: int):
    """``(images memmap, meta dict)`` if the cache at ``cache`` has ``key``, else None."""
    meta_file = _meta_path(cache)
    if not cache.is_file() or not meta_file.is_file():
        return None
    try:
        with np.load(meta_file) as z:
            meta = {k: z[k] for k in z.files}
        if str(meta["key"]) != key:
            return None
        images = np.load(cache, mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    kept = meta["kept"]
    if images.shape != (len(kept), size, size, 3) or images.dtype != np.uint8 or (len(kept) and kept.max() >= n_files):
        return None
    return images, meta


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _publish_cache(cache: Path, tmp: Path, key: str, meta: dict) -> np.ndarray:
    """Rename the finished images file ``tmp`` to ``cache``, then write the
    sidecar (atomically, last); returns the images memory-mapped."""
    meta_file = _meta_path(cache)
    meta_file.unlink(missing_ok=True)  # no sidecar may vouch for a half-replaced images file
    os.replace(tmp, cache)
    tmp_meta = _tmp_path(meta_file).with_suffix(".npz")
    np.savez(tmp_meta, key=np.asarray(key), **meta)
    os.replace(tmp_meta, meta_file)
    return np.load(cache, mmap_mode="r")


def _compact(buf: np.ndarray, kept: np.ndarray, cache_tmp: Path | None):
    """Keep rows ``kept`` of ``buf`` (ascending) without holding a second copy
    in RAM: in place for an array, into a fresh memmap file for a cache."""
    if cache_tmp is None:
        for j, i in enumerate(kept):
            if i != j:
                buf[j] = buf[i]
        return buf[: len(kept)]
    out = np.lib.format.open_memmap(cache_tmp, mode="w+", dtype=np.uint8, shape=(len(kept), *buf.shape[1:]))
    for a in range(0, len(kept), 64):  # bounded RAM: 64 frames at a time
        out[a : a + 64] = buf[kept[a : a + 64]]
    out.flush()
    return out


# ------------------------------------------------------------------- load


def _decode_split(spec: SplitSpec, size: int, cache: Path | None, key: str | None, workers):
    """Decode every image of ``spec`` (into RAM, or a new cache file);
    ``(images, kept, rects, orig_shapes, errors)`` for the readable ones."""
    n = len(spec)
    tmp = None if cache is None else _tmp_path(cache)
    if tmp is None:
        buf = np.empty((n, size, size, 3), np.uint8)
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        buf = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    try:
        rects, shapes, errors = read_images(spec.files, size, buf, declared=spec.shapes, workers=workers)
        kept = np.asarray([i for i in range(n) if i not in errors], np.int64)
        if len(kept) == 0:
            raise DataError(skip_message(spec.source, spec.files, errors, fatal=True))
        rects, shapes = rects[kept], shapes[kept]
        if not errors:
            images = buf
        elif tmp is None:
            images = _compact(buf, kept, None)
        else:
            images = _compact(buf, kept, tmp.with_name(tmp.name + "2"))
            os.replace(images.filename, tmp)
        if tmp is not None:
            images.flush()
            images = buf = None  # close the memmaps before the rename
            failed = np.asarray(sorted(errors), np.int64)
            meta = {
                "kept": kept,
                "content": rects,
                "orig_shapes": shapes,
                "failed": failed,
                "reasons": np.asarray([errors[i] for i in failed], dtype=str).reshape(-1),
            }
            images = _publish_cache(cache, tmp, key, meta)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + "2").unlink(missing_ok=True)
    return images, kept, rects, shapes, errors


def load_split(
    spec: SplitSpec, *, img_size: int, cache=None, workers: int | None = None, warn=None
) -> DetectionData:
    """Decode, letterbox (and cache) one split.

    Args:
      spec: from :func:`jaxyolo.data.formats.discover`.
      img_size: S.
      cache: optional path of the ``.npy`` cache file (its sidecar goes next
        to it); ``None`` keeps everything in RAM.
      workers: decoding threads (default: the CPU count).
      warn: ``callable(str)`` for the one skipped-images line (default: print
        ``warning: ...`` to stderr).

    Returns:
      :class:`DetectionData` with ``images (N, S, S, 3)`` uint8 (a read-only
      memmap with a cache), ``labels`` normalised to the S x S frames,
      ``content (N, 4)`` int32 ``[top, left, h, w]``, ``orig_shapes (N, 2)``
      int32 ``[h, w]``, ``files``; N counts the readable images only.

    Raises:
      DataError when no image can be read.
    """
    warn = warn or print_warning
    size, n = int(img_size), len(spec)
    cache = Path(cache) if cache is not None else None
    key = _cache_key(spec, size) if cache is not None else None
    hit = _read_cache(cache, key, n, size) if cache is not None else None
    if hit is not None:
        images, meta = hit
        kept, rects, shapes = meta["kept"], meta["content"], meta["orig_shapes"]
        errors = {int(i): str(r) for i, r in zip(meta["failed"], meta["reasons"])}
    else:
        images, kept, rects, shapes, errors = _decode_split(spec, size, cache, key, workers)
    if errors:
        warn(skip_message(spec.source, spec.files, errors))
    labels = tuple(letterbox_labels(spec.labels[i], r, size) for i, r in zip(kept, rects))
    files = tuple(spec.files[i] for i in kept)
    return DetectionData(images, labels, spec.names, content=np.asarray(rects, np.int32), orig_shapes=np.asarray(shapes, np.int32), files=files)


def load_dataset(data, split: str, *, img_size: int, images=None, nc: int | None = None, cache=None, workers=None, warn=None) -> DetectionData:
    """:func:`~jaxyolo.data.formats.discover` + :func:`load_split`: split
    ``split`` of a data.yaml / COCO / plain-layout dataset as letterboxed
    :class:`DetectionData`."""
    return load_split(discover(data, split, images=images, nc=nc), img_size=img_size, cache=cache, workers=workers, warn=warn)
