"""The input pipeline: vectorised batch gathers and a background prefetcher.

Decoded images stay ``uint8`` in host memory (a numpy array, or a
``np.memmap`` of a cache file for sets that don't fit in RAM), or stream
from their files (:mod:`jaxyolo.data.stream`: decoded by worker processes
as the batches ask), and the labels are padded once to ``(N, M, ...)``
arrays, so a batch is one fancy-index gather per array: no per-record
Python.  Batch ``k`` of epoch ``e`` is a pure
function of ``(seed, e, k)`` (the epoch's permutation is drawn from
``(seed, e)``), so a checkpoint stores only the position and ``--resume``
replays the identical next batch.

Per-image augmentation is *not* done here: it runs on the device inside the
jitted train step (:mod:`jaxyolo.data.augment`), keyed by the global step.
For a mosaic the pipeline gathers K = 4 frames per sample: the sample itself
and 3 others drawn uniformly from the dataset (upstream's
``Mosaic.get_indexes`` without its buffer) or, with ``mosaic_buffer``, from
the last batches' samples (with it), also a function of ``(seed, epoch, k)``.

With several processes (multi-host), process ``p`` of ``P`` gathers only
rows ``[p B / P, (p + 1) B / P)`` of every global batch, and
:class:`Prefetcher` assembles the global ``jax.Array`` from the local pieces
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import collections
import queue
import threading

import numpy as np

from jaxyolo.data.decode import letterbox_boxes
from jaxyolo.data.stream import StreamedData

__all__ = ["PaddedLabels", "pad_labels", "epoch_permutation", "TrainBatches", "eval_batches", "Prefetcher"]


class PaddedLabels(dict):
    """``boxes (N, M, 4)`` float32 normalised cxcywh, ``classes (N, M)`` int32,
    ``mask (N, M)`` bool: every image's labels padded to ``M`` once."""


def pad_labels(labels, max_boxes: int) -> PaddedLabels:
    """Pad per-image ``(n_i, 5) [class, cx, cy, w, h]`` rows to ``max_boxes``.

    Images with more than ``max_boxes`` objects keep the first ``max_boxes``
    (the count of dropped boxes is ``sum(n_i) - mask.sum()``).
    """
    n = len(labels)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    classes = np.zeros((n, max_boxes), np.int32)
    mask = np.zeros((n, max_boxes), bool)
    for i, lab in enumerate(labels):
        lab = np.asarray(lab, np.float32).reshape(-1, 5)[:max_boxes]
        k = len(lab)
        boxes[i, :k], classes[i, :k], mask[i, :k] = lab[:, 1:], lab[:, 0].astype(np.int32), True
    return PaddedLabels(boxes=boxes, classes=classes, mask=mask)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` training images in ``epoch``: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class TrainBatches:
    """Training batches by position: ``batch(epoch, k, mosaic)`` is a dict of
    numpy arrays ``image (b, K, S, S, 3) uint8``, ``rects (b, K, 4)`` int32
    content rectangles ``[top, left, h, w]``, ``boxes (b, K, M, 4)``,
    ``classes (b, K, M)``, ``mask (b, K, M)``, where ``b = batch_size /
    process_count`` are this process's rows of global batch ``k`` of
    ``epoch`` and K = 4 with ``mosaic`` (the sample, then 3 random others),
    else 1.  The last partial batch of an epoch is dropped (static shapes).

    Args:
      data: a :class:`jaxyolo.data.DetectionData` (``images`` may be a
        memmap) or a streamed :class:`jaxyolo.data.StreamedData` (decoded as
        the batches ask; :meth:`stream` keeps the decodes ahead).
      batch_size: the global batch B.
      max_boxes: M.
      seed: data order seed.
      process_index, process_count: this process's share of each batch.
      mosaic_buffer: 0 (default): a mosaic's 3 other frames are drawn
        uniformly from the whole dataset; W > 0: from the samples of the last
        W global batches of the epoch (batch ``k``'s own included), the
        deterministic form of ultralytics' buffer of recently loaded images:
        a streamed dataset then decodes about one frame per sample instead
        of four.
    """

    def __init__(self, data, *, batch_size: int, max_boxes: int, seed: int, process_index: int = 0, process_count: int = 1, mosaic_buffer: int = 0):
        if len(data) < batch_size:
            raise ValueError(f"the training set has {len(data)} images, fewer than batch={batch_size}")
        if batch_size % process_count:
            raise ValueError(f"batch={batch_size} is not divisible by the {process_count} processes")
        if not isinstance(mosaic_buffer, int) or isinstance(mosaic_buffer, bool) or mosaic_buffer < 0:
            raise ValueError(f"mosaic_buffer must be an int >= 0, got {mosaic_buffer!r}")
        self.source = _Source(data, max_boxes)
        self.n = len(data)
        self.batch_size, self.seed, self.mosaic_buffer = batch_size, seed, mosaic_buffer
        self.steps_per_epoch = self.n // batch_size
        per = batch_size // process_count
        self._rows = slice(process_index * per, (process_index + 1) * per)
        self._epoch, self._perm, self._others = None, None, None

    def _draw(self, epoch: int):
        if self._epoch != epoch:
            self._perm = epoch_permutation(self.n, seed=self.seed, epoch=epoch)
            self._others = np.random.default_rng([self.seed, epoch, 4]).integers(0, self.n, (self.n, 3))
            self._epoch = epoch

    def indices(self, epoch: int, k: int, *, mosaic: bool = False) -> np.ndarray:
        """Dataset indices ``(b, K)`` of this process's rows of batch ``k`` of ``epoch``."""
        if not 0 <= k < self.steps_per_epoch:
            raise IndexError(f"batch {k} out of range for {self.steps_per_epoch} batches per epoch")
        self._draw(epoch)
        b = self.batch_size
        rows = slice(k * b, (k + 1) * b)
        idx = self._perm[rows][self._rows, None]
        if not mosaic:
            return idx
        if self.mosaic_buffer:
            recent = np.random.default_rng([self.seed, epoch, 4, k]).integers(max(0, (k - self.mosaic_buffer + 1) * b), (k + 1) * b, (b, 3))
            others = self._perm[recent]
        else:
            others = self._others[rows]
        return np.concatenate([idx, others[self._rows]], axis=1)

    def batch(self, epoch: int, k: int, *, mosaic: bool = False) -> dict:
        return self.source.collect(self.source.request(self.indices(epoch, k, mosaic=mosaic)))

    def stream(self, positions, *, mosaic_of, ahead: int = 2):
        """Yield ``(position, batch)`` for each ``(epoch, k)`` of ``positions``
        with ``mosaic_of(epoch)``; a streamed dataset's decodes run ``ahead``
        batches in front of the one yielded."""
        pending = collections.deque()
        positions = iter(positions)
        while True:
            while len(pending) <= ahead:
                pos = next(positions, None)
                if pos is None:
                    break
                pending.append((pos, self.source.request(self.indices(*pos, mosaic=mosaic_of(pos[0])))))
            if not pending:
                return
            pos, req = pending.popleft()
            yield pos, self.source.collect(req)

    def positions(self, epoch: int, k: int, *, epochs: int, max_steps: int | None = None, done: int = 0):
        """Yield ``(epoch, k)`` from the given position to the end of
        ``epochs`` (or until ``max_steps`` global steps, ``done`` already done)."""
        while epoch < epochs:
            while k < self.steps_per_epoch:
                if max_steps is not None and done >= max_steps:
                    return
                yield epoch, k
                done += 1
                k += 1
            epoch, k = epoch + 1, 0


def eval_batches(data, *, batch_size: int, max_boxes: int, process_index: int = 0, process_count: int = 1):
    """Yield ``(batch, n_valid)`` over ``data`` in order, every batch of the
    static global size ``batch_size``: the last one is padded with copies of
    the first image with no labels (``n_valid`` real images).  With several
    processes each yields its rows of the global batch (as
    :class:`TrainBatches`).  A streamed dataset decodes the next batch while
    this one is evaluated."""
    source = _Source(data, max_boxes)
    n = len(data)
    per = batch_size // process_count
    rows = slice(process_index * per, (process_index + 1) * per)

    def request(start):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        return valid, source.request(np.where(valid, idx, 0)[rows])

    starts = range(0, n, batch_size)
    nxt = request(0) if n else None
    for j, _ in enumerate(starts):
        valid, req = nxt
        nxt = request(starts[j + 1]) if j + 1 < len(starts) else None
        batch = source.collect(req)
        del batch["rects"]
        batch["mask"] = batch["mask"] & valid[rows][:, None]
        yield batch, int(valid.sum())


class _Source:
    """Batches of ``data`` by dataset indices: ``collect(request(idx))`` is
    ``image (*idx.shape, S, S, 3) uint8``, ``rects (*idx.shape, 4)`` int32,
    ``boxes``, ``classes``, ``mask`` (labels padded to M).  In memory the
    request is the indices; for a :class:`jaxyolo.data.stream.StreamedData`
    it starts the decodes, and the labels (kept normalised to the original
    images) are letterboxed by the decoded rects: the same numbers as the
    labels of :func:`jaxyolo.data.load_data`."""

    def __init__(self, data, max_boxes: int):
        self.streamed = isinstance(data, StreamedData)
        self.images, self.size = data.images, data.img_size
        self.labels = pad_labels(data.source_labels if self.streamed else data.labels, max_boxes)
        self.rects = None if self.streamed else np.asarray(data.content_rects, np.int32)

    def request(self, idx):
        return (idx, self.images.request(idx)) if self.streamed else (idx, None)

    def collect(self, req) -> dict:
        idx, ticket = req
        labels = {name: a[idx] for name, a in self.labels.items()}
        if ticket is None:
            return {"image": self.images[idx], "rects": self.rects[idx], **labels}
        image, rects, ok = self.images.collect(ticket)
        mask = labels["mask"] & ok[..., None]
        boxes = np.where(mask[..., None], letterbox_boxes(labels["boxes"], rects[..., None, :], self.size), np.float32(0))
        return {"image": image, "rects": rects, "boxes": boxes, "classes": np.where(mask, labels["classes"], 0), "mask": mask}


class Prefetcher:
    """Turn host batches into device arrays on a background thread.

    ``source`` yields ``(tag, host_batch)``; iterating the prefetcher yields
    ``(tag, device_batch)`` with ``depth`` batches gathered and transferred
    ahead of the consumer (``jax.device_put``/``make_array_from_process_local_data``
    with ``sharding``, the batch sharding of the train step), so host work
    overlaps the device's.  An exception in the thread is re-raised in the
    consumer.  Use as a context manager (or call :meth:`close`) so an early
    exit stops the thread.
    """

    _END = object()

    def __init__(self, source, *, sharding, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._source, self._sharding = source, sharding
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxyolo-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for tag, batch in self._source:
                if not self._put((tag, to_device(batch, self._sharding))):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_device(batch: dict, sharding) -> dict:
    """Host batch (this process's rows) -> global ``jax.Array`` leaves sharded by ``sharding``."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
