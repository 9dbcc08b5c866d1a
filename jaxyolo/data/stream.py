"""Streamed datasets: images decoded from their files when a batch needs them.

A :class:`StreamedData` is a dataset split as its *index* (file paths and
labels from :func:`jaxyolo.data.formats.discover`: a label-file scan or a COCO
JSON, no image opened) and a :class:`StreamedFrames`, an ``(N, S, S, 3)``
uint8 array-like whose rows are decoded and letterboxed on demand
(:func:`jaxyolo.data.decode.decode_into`, the same pixels as
:func:`jaxyolo.data.load_data`) by a :class:`DecodePool` of worker processes.
The batch order stays the pipeline's own (:class:`jaxyolo.data.TrainBatches`,
a pure function of ``(seed, epoch, k)``), so a streamed and a cached split
give identical batches and ``--resume`` replays the identical next batch with
any number of workers.

Two caches (``cache``):

* ``"none"``: frames go through a ring of shared rows, sized for the batches
  in flight: memory does not grow with the dataset.  A frame stays in its
  row until the row is the least recently used one needed for a new image,
  so an image asked for again soon (a mosaic's other frames with
  ``mosaic_buffer``) is not decoded again.
* ``"ram"``: a frame is decoded the first time a batch asks for it, into its
  row of an ``(N, S, S, 3)`` shared buffer, and gathered from there
  afterwards (epoch 1 streams, later epochs gather).  Nothing is decoded
  before the first step, and with several processes each one decodes only
  the images of its own rows.

The shared buffers are files in ``/dev/shm`` (RAM) when it has room, else in
the temporary folder, unlinked as soon as they are made (on Linux; nothing
is left behind by a killed run); workers write decoded frames straight into
them, the pipe carries only the task and a 30-byte answer.  The workers are plain
interpreters running :func:`jaxyolo.data.decode.serve`: they import numpy,
Pillow and OpenCV, not jax (~50 MB each, started in ~0.2 s), so decoding is
neither GIL-bound nor a copy of the training process.  A worker that dies (a
decoder crash, the OOM killer) is replaced; its image counts as unreadable.

Unreadable images: a file that cannot be decoded, is smaller than 10 px, or
differs from its COCO entry's size is found only when a batch needs it (the
index opens no image).  Its frame is the letterbox grey with no labels (the
row's ``mask`` is False), it is never asked again, and
:meth:`StreamedFrames.take_failures` returns it once, for the run's warning
line.  :func:`jaxyolo.data.load_data` (decoded up front) drops such files
from the split instead; on a clean dataset both give the same batches.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from concurrent.futures import Future

import numpy as np

from jaxyolo.data import decode
from jaxyolo.data.decode import PAD_VALUE, letterbox_boxes

__all__ = ["CACHES", "RAM_FRACTION", "DecodePool", "StreamedFrames", "StreamedData", "open_split", "choose_cache", "default_cache_dir", "default_workers"]

CACHES = ("auto", "ram", "disk", "none")
RAM_FRACTION = 0.5  # cache="auto" picks "ram" when the decoded splits fit in this fraction of the available memory

# A worker: a clean interpreter that loads decode.py by its path (not the jaxyolo package, which imports jax).
_BOOT = (
    "import sys, importlib.util as u; sys.path = [p for p in sys.path if p]; "
    "s = u.spec_from_file_location('_jaxyolo_decode', sys.argv[1]); m = u.module_from_spec(s); "
    "s.loader.exec_module(m); m.serve()"
)
_MAX_DEATHS = 3  # a worker that dies this many times in a row on consecutive tasks: stop, it is not the images


def default_workers() -> int:
    """Decode workers when none are asked for: the usable CPUs minus one (the
    training process keeps a core), at least 1, at most 8 (ultralytics' default
    ``workers``); e.g. 1 on a 2-core machine, 8 on a 16-core GPU host."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


def default_cache_dir(data) -> "os.PathLike":
    """Where ``cache="disk"`` keeps a dataset's decoded frames when no folder
    is given: ``$XDG_CACHE_HOME/jaxyolo/<name>-<hash of its absolute path>``
    (``~/.cache`` without it), so a read-only dataset folder still caches."""
    import hashlib
    from pathlib import Path

    p = Path(data).absolute()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "jaxyolo" / f"{p.stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:12]}"


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_cache(cache: str, *, n_images: int, img_size: int, memory: int | None = None) -> tuple:
    """Resolve ``cache`` (one of :data:`CACHES`) for ``n_images`` frames of
    ``S = img_size``: ``(mode, reason)``, ``mode`` in ``{"ram", "disk",
    "none"}``; ``"auto"`` is ``"ram"`` when the decoded frames (``n_images x
    S x S x 3`` bytes) fit in :data:`RAM_FRACTION` of ``memory`` (default:
    the available memory now), else ``"none"`` (streamed)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
    need = n_images * img_size * img_size * 3
    if cache != "auto":
        return cache, "as asked"
    memory = available_memory() if memory is None else memory
    fits = need <= RAM_FRACTION * memory
    why = f"{need / 2**30:.2f} GB decoded {'fits' if fits else 'exceeds'} {RAM_FRACTION:.0%} of {memory / 2**30:.1f} GB available"
    return ("ram" if fits else "none"), why


# ------------------------------------------------------------------ workers


class DecodePool:
    """``workers`` decode processes fed by one thread each from a shared queue.

    ``submit(task)`` returns a :class:`~concurrent.futures.Future` of the
    reply of :func:`jaxyolo.data.decode.run_task` to ``task = (buffer, rows,
    row, path, declared, size)``.  ``workers=0`` decodes in the calling thread (for
    tests and tiny sets).  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, workers: int):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self.workers = workers
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._procs = [None] * workers
        self._threads = [threading.Thread(target=self._feed, args=(i,), name=f"jaxyolo-decode-{i}", daemon=True) for i in range(workers)]
        self._inline_buffers: dict = {}
        self._closed = False
        for t in self._threads:
            t.start()
        self._finalizer = weakref.finalize(self, DecodePool._shutdown, self._tasks, self._procs, self._threads)

    @staticmethod
    def _spawn():
        return subprocess.Popen([sys.executable, "-c", _BOOT, decode.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)

    def _feed(self, i: int):
        proc, deaths = None, 0
        while True:
            item = self._tasks.get()
            if item is None:
                break
            task, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if proc is None:
                    proc = self._procs[i] = self._spawn()
                pickle.dump(task, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
                reply = pickle.load(proc.stdout)
                deaths = 0
            except (EOFError, OSError, pickle.UnpicklingError):
                code = proc.poll() if proc is not None else None
                if proc is not None:
                    proc.kill()
                    proc.wait()
                proc = self._procs[i] = None
                deaths += 1
                if deaths >= _MAX_DEATHS:
                    fut.set_exception(RuntimeError(f"the image decode worker died {deaths} times in a row (last exit code {code}); see its error above"))
                    continue
                reply = ("err", f"the decode worker died (exit code {code})")
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer
                fut.set_exception(e)
                continue
            _resolve(fut, reply)
        if proc is not None:
            DecodePool._stop(proc)

    @staticmethod
    def _stop(proc):
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except Exception:
            proc.kill()
            proc.wait()

    def submit(self, task) -> Future:
        if self._closed:
            raise RuntimeError("the decode pool is closed")
        fut: Future = Future()
        if self.workers == 0:
            _resolve(fut, decode.run_task(task, self._inline_buffers))
            return fut
        self._tasks.put((task, fut))
        return fut

    @staticmethod
    def _shutdown(tasks, procs, threads):
        while True:  # what nobody will collect is not decoded
            try:
                item = tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        for _ in threads:
            tasks.put(None)
        for t in threads:
            t.join(timeout=10)
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()

    def close(self):
        self._closed = True
        self._inline_buffers.clear()
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve(fut: Future, reply) -> None:
    """A worker's reply -> the future's result; a ``"fatal"`` one (the
    buffer cannot be opened: every image would fail) -> an exception."""
    if reply[0] == "fatal":
        fut.set_exception(RuntimeError(f"image decoding cannot run: {reply[1]}"))
    else:
        fut.set_result(reply)


# ------------------------------------------------------------------ frames


def _buffer_file(rows: int, size: int):
    """A new raw ``(rows, S, S, 3)`` uint8 file in ``/dev/shm`` when it has
    room for it, else the temporary folder: ``(path, memmap, release)``.

    On Linux the file is unlinked at once and reached through
    ``/proc/<pid>/fd/<fd>`` (the path the workers open), so that it goes with
    the last process that maps it even when the training process is killed
    (SIGKILL leaves nothing in ``/dev/shm``); ``release()`` closes it.
    Elsewhere it is a named file that ``release()`` removes.
    """
    nbytes = rows * size * size * 3
    folder = tempfile.gettempdir()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 1.1 * nbytes:
        folder = "/dev/shm"
    fd, path = tempfile.mkstemp(prefix=f"jaxyolo-frames-{os.getpid()}-", suffix=".u8", dir=folder)
    os.ftruncate(fd, nbytes)
    proc = f"/proc/{os.getpid()}/fd/{fd}"
    if os.path.exists(proc):
        os.unlink(path)
        return proc, np.memmap(proc, np.uint8, "r+", shape=(rows, size, size, 3)), lambda: os.close(fd)
    os.close(fd)
    return path, np.memmap(path, np.uint8, "r+", shape=(rows, size, size, 3)), lambda: _remove(path)


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class _Request:
    """What :meth:`StreamedFrames.request` dispatched: the indices, the row of
    each in the buffer, the decodes to wait for, and the rows it pinned."""

    __slots__ = ("idx", "rows", "pending", "claimed")

    def __init__(self, idx, rows, pending, claimed):
        self.idx, self.rows, self.pending, self.claimed = idx, rows, pending, claimed


class StreamedFrames:
    """``(N, S, S, 3)`` uint8 letterboxed frames of ``files``, decoded on demand.

    ``frames[idx]`` decodes (or, with ``cache="ram"``, gathers) and returns a
    copy; :meth:`request` + :meth:`collect` split that in two so that the
    decodes of the next batches run while the current one trains.

    Args:
      files: N image paths.
      size: S.
      pool: the :class:`DecodePool` (may be shared between splits).
      declared: optional ``(N, 2)`` ``[h, w]`` each image must have (COCO).
      cache: ``"ram"`` (keep every decoded frame in an N-row shared buffer)
        or ``"none"`` (a ring of ``ring`` rows).
      ring: ``"none"`` only: rows of the ring, at least the distinct frames
        of all the requests in flight at once; the rows beyond keep recent
        frames for reuse.

    Attributes:
      rects: ``(N, 4)`` int32 ``[top, left, h, w]`` content rectangles, valid
        where ``known``; orig_shapes: ``(N, 2)`` int32 ``[h, w]``; known:
        ``(N,)`` bool, decoded at least once; failed: index -> reason.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files, size: int, *, pool: DecodePool, declared=None, cache: str = "none", ring: int = 256):
        if cache not in ("ram", "none"):
            raise ValueError(f"cache must be 'ram' or 'none', got {cache!r}")
        self.files = tuple(os.fspath(f) for f in files)
        n = len(self.files)
        self.size, self.cache, self.pool = int(size), cache, pool
        self.declared = None if declared is None else np.asarray(declared, np.int64)
        self.rects = np.zeros((n, 4), np.int32)
        self.orig_shapes = np.zeros((n, 2), np.int32)
        self.known = np.zeros(n, bool)
        self.failed: dict = {}
        self._new_failures: list = []
        self._rows = n if cache == "ram" else int(ring)
        self._path, self._buf, release = _buffer_file(max(self._rows, 1), self.size)
        self._finalizer = weakref.finalize(self, release)
        self._lock = threading.Lock()
        self._inflight: dict = {}  # index -> Future of its decode
        # Which row holds which image: "ram" row i is image i; "none" rows are
        # claimed while a request uses them, then stay valid (and are reused
        # by a later request of the same image) until the least recently
        # used of them is evicted for a new image.
        self._row_of: dict = {}
        self._index_of = np.full(self._rows, -1, np.int64)
        self._pins = np.zeros(self._rows, np.int32)
        self._idle: collections.OrderedDict = collections.OrderedDict()  # unpinned rows with a frame, least recent first
        self._free = collections.deque(range(self._rows)) if cache == "none" else None

    @property
    def shape(self) -> tuple:
        return (len(self.files), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.files)

    def _submit(self, i: int, row: int) -> Future:
        declared = None if self.declared is None else tuple(int(v) for v in self.declared[i])
        return self.pool.submit((self._path, self._rows, row, self.files[i], declared, self.size))

    def _claim(self, i: int):
        """A row for image ``i``, pinned: ``(row, True)`` if ``i`` must be
        decoded into it, ``(row, False)`` if it holds (or is receiving) ``i``."""
        row = self._row_of.get(i)
        if row is not None:
            self._pins[row] += 1
            self._idle.pop(row, None)
            return row, False
        if self.cache == "ram":
            row = i
        elif self._free:
            row = self._free.popleft()
        elif self._idle:
            row, _ = self._idle.popitem(last=False)
            del self._row_of[int(self._index_of[row])]
        else:
            raise RuntimeError(f"the frame ring holds {self._rows} rows, all in use by the requests in flight")
        self._row_of[i], self._index_of[row], self._pins[row] = row, i, 1
        return row, True

    def request(self, idx) -> _Request:
        """Start decoding the frames ``idx`` (any shape of indices) that need it."""
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"frame indices out of range [0, {len(self)})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = np.zeros(len(uniq), np.int64)  # an unreadable image's row is never read
        pending, claimed = {}, []
        with self._lock:
            for j, i in enumerate(uniq.tolist()):
                if i in self.failed:
                    continue
                rows[j], new = self._claim(i)
                claimed.append(int(rows[j]))
                if new:
                    self._inflight[i] = self._submit(i, int(rows[j]))
                if i in self._inflight:
                    pending[i] = self._inflight[i]
        return _Request(idx, rows[inverse].reshape(idx.shape), pending, claimed)

    def collect(self, req: _Request):
        """Wait for ``req``'s decodes: ``(frames (*idx.shape, S, S, 3) uint8
        (a copy), rects (*idx.shape, 4) int32, ok (*idx.shape,) bool)``; an
        unreadable image's frame is all ``PAD_VALUE`` with the full frame as
        its rect and ``ok`` False."""
        replies = {i: fut.result() for i, fut in req.pending.items()}
        with self._lock:
            for i, reply in replies.items():
                if self._inflight.pop(i, None) is None:
                    continue  # another request recorded it
                if reply[0] == "ok":
                    self.rects[i], self.orig_shapes[i], self.known[i] = reply[1], reply[2], True
                elif i not in self.failed:
                    self.failed[i] = reply[1]
                    self._new_failures.append(i)
                    self._index_of[self._row_of.pop(i)] = -1  # the row holds no frame
            frames = np.asarray(self._buf[req.rows])  # fancy indexing: a copy
            for row in req.claimed:
                self._pins[row] -= 1
                if self._pins[row] == 0 and self.cache == "none":
                    if self._index_of[row] >= 0:
                        self._idle[row] = None  # the most recently used
                    else:
                        self._free.append(row)
            ok = np.asarray([i not in self.failed for i in req.idx.ravel().tolist()], bool).reshape(req.idx.shape)
            rects = self.rects[req.idx]
        if not ok.all():
            frames[~ok] = PAD_VALUE
            rects[~ok] = (0, 0, self.size, self.size)
        return frames, rects, ok

    def __getitem__(self, idx):
        return self.collect(self.request(idx))[0]

    def take_failures(self) -> list:
        """``[(path, reason)]`` of the images found unreadable since the last call."""
        with self._lock:
            new, self._new_failures = self._new_failures, []
        return [(self.files[i], self.failed[i]) for i in new]

    def close(self):
        """Drop the shared buffer (its file goes when no worker maps it any more)."""
        self._buf = None
        self._finalizer()


class StreamedData:
    """A dataset split whose images are :class:`StreamedFrames`; the same
    attributes as :class:`jaxyolo.data.DetectionData` (``images``, ``labels``,
    ``names``, ``nc``, ``img_size``, ``files``, ``max_objects()``) plus
    ``source_labels``: N ``(n_i, 5)`` float32 rows normalised to the original
    images (the index's, before letterboxing)."""

    def __init__(self, images: StreamedFrames, source_labels, names):
        if len(source_labels) != len(images):
            raise ValueError(f"{len(source_labels)} label arrays for {len(images)} images")
        self.images, self.source_labels, self.names = images, tuple(source_labels), tuple(names)

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def img_size(self) -> int:
        return self.images.size

    @property
    def files(self) -> tuple:
        return self.images.files

    def __len__(self) -> int:
        return len(self.images)

    def max_objects(self) -> int:
        return max((len(lab) for lab in self.source_labels), default=0)

    @property
    def failed(self) -> dict:
        """index -> reason of the images found unreadable so far."""
        return self.images.failed

    def _rect(self, i: int):
        """Image ``i``'s content rect: decoded, else from its header (None if unreadable)."""
        frames = self.images
        if i in frames.failed:
            return None
        return frames.rects[i] if frames.known[i] else _header_rect(frames.files[i], self.img_size)

    @property
    def content_rects(self) -> np.ndarray:
        """``(N, 4)`` int32 ``[top, left, h, w]`` (an unreadable image: the full frame)."""
        full = np.asarray([0, 0, self.img_size, self.img_size], np.int32)
        return np.stack([r if (r := self._rect(i)) is not None else full for i in range(len(self))]).astype(np.int32)

    @property
    def labels(self) -> tuple:
        """N ``(n_i, 5)`` labels normalised to the letterboxed frames.  An
        image not decoded yet (another process's, in a multi-process
        evaluation) gets its rect from its header (:func:`jaxyolo.data.decode.image_size`);
        an unreadable one has no labels."""
        out = []
        for i, lab in enumerate(self.source_labels):
            rect = self._rect(i)
            if rect is None:
                out.append(np.zeros((0, 5), np.float32))
                continue
            lab = np.array(lab, np.float32).reshape(-1, 5)
            lab[:, 1:] = letterbox_boxes(lab[:, 1:], rect[None], self.img_size)
            out.append(lab)
        return tuple(out)

    def close(self):
        self.images.close()


def _header_rect(path, size: int):
    """The content rect of ``path``'s frame from its header, or None if unreadable."""
    try:
        return decode.letterbox_rect(*decode.image_size(path), size)
    except Exception:
        return None


def open_split(spec, *, img_size: int, pool: DecodePool, cache: str = "none", ring: int = 256) -> StreamedData:
    """A :class:`~jaxyolo.data.formats.SplitSpec` (the index) as :class:`StreamedData`; opens no image."""
    frames = StreamedFrames(spec.files, img_size, pool=pool, declared=spec.shapes, cache=cache, ring=ring)
    return StreamedData(frames, spec.labels, spec.names)
