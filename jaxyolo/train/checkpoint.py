"""Run folders: orbax checkpoints, the writer's lock, and loading a saved run.

``out_dir/checkpoints/<step>/`` holds three orbax items: ``state`` (params,
BatchNorm stats, optimiser state, step), ``ema`` (EMA params + stats) and
``meta`` (config, epoch, step in epoch, the partial epoch sums of the logged
values, history, class names).  orbax writes into a temporary directory and
renames it when complete, so a process killed in the middle of a save leaves
the previous checkpoint as the latest one.  Every process calls
:func:`save`/:func:`restore` (orbax coordinates a multi-host write: the
replicated arrays and the JSON are written once).  Saves are asynchronous:
:func:`save` returns once the arrays are copied to host memory, and orbax
writes the files in the background while training goes on; the next save,
and :func:`finish` at the end of a run, wait for it.

The arrays are packed (:func:`pack`): each item is one flat array per dtype,
and ``meta["layout"]`` lists every tensor's path, shape and dtype in
order, which :func:`restore` checks against the model restoring it (and
which a reader without jaxyolo needs to cut the arrays apart).  orbax spends
about 1.5 ms of host CPU per array written; for the ~1000 tensors of a train
state that was 2 s a checkpoint, taken from the training steps.

:class:`RunLock` makes a run folder single-writer: a second process training
into the same ``--out`` is refused with the holder's pid and host.  Its
``.lock`` file exists while a process trains (or after one was killed).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "manager", "layout", "pack", "unpack", "save", "finish", "Writer", "CheckpointError", "restore", "restore_meta", "find_run_dir"]


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive ``fcntl`` lock on ``out_dir/.lock`` for the duration of a run.

    The kernel drops the lock when the holder exits, however it exits
    (``kill -9`` included), so a stale lock never blocks a later resume.
    The file records the holder (pid, host, start time) for the error
    message of a second writer.  :meth:`release` (a clean exit, or an
    exception leaving the run, once every write has finished) deletes it,
    so a ``.lock`` left in a folder nobody trains in marks a holder that was
    killed: the next :meth:`acquire` takes it over and keeps the dead
    holder's line in :attr:`stale`.

    The holder deletes the file while it still holds the lock, and
    :meth:`acquire` keeps a lock only on the file that is at the path once
    locked: a process that opened the file just before it was deleted locks
    a file no one else will see, notices, and locks the new one instead.
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / ".lock"
        self.stale = None
        self._fd = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._lock()
        while not self._at_path(fd):  # deleted by the holder that released it as we opened it
            os.close(fd)
            fd = self._lock()
        self.stale = os.pread(fd, 4096, 0).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {now})\n".encode(), 0)
        self._fd = fd
        return self

    def _lock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by {holder}; wait for it to finish or choose another --out") from None
        return fd

    def _at_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self):
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: see the class docstring
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def manager(out_dir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (Path(out_dir) / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True),
    )


def layout(tree) -> list:
    """``[[path, shape, dtype], ...]`` of ``tree``'s leaves in flatten order
    (``path`` as :func:`jax.tree_util.keystr`): how :func:`pack` lays them out."""
    import jax

    return [[jax.tree_util.keystr(p), list(x.shape), str(x.dtype)] for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def pack(tree) -> dict:
    """``tree``'s leaves as one flat array per dtype (``{dtype: (n,)}``, the
    leaves raveled and concatenated in flatten order); traceable.  See the
    module docstring for why checkpoints are packed."""
    import jax
    import jax.numpy as jnp

    groups = {}
    for x in jax.tree.leaves(tree):
        groups.setdefault(str(x.dtype), []).append(jnp.ravel(x))
    return {dt: jnp.concatenate(xs) for dt, xs in groups.items()}


def unpack(packed: dict, template):
    """Inverse of :func:`pack`: ``template``'s structure, shapes and dtypes
    filled from ``packed``; traceable."""
    import jax
    import numpy as np

    leaves, treedef = jax.tree.flatten(template)
    offsets = dict.fromkeys(packed, 0)
    out = []
    for x in leaves:
        dt, n = str(x.dtype), int(np.prod(x.shape))
        out.append(packed[dt][offsets[dt]:offsets[dt] + n].reshape(x.shape))
        offsets[dt] += n
    return jax.tree.unflatten(treedef, out)


def save(mngr, step: int, items: dict, meta: dict):
    """Write checkpoint ``step``: ``items`` maps names to :func:`pack` ed
    arrays, ``meta`` is JSON (atomically, orbax's file writes in the
    background: see the module docstring)."""
    import orbax.checkpoint as ocp

    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    mngr.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)), force=True)


def finish(mngr):
    """Wait for the last checkpoint write and release the manager."""
    mngr.wait_until_finished()
    mngr.close()


class Writer:
    """Checkpoints of one training run, in the packed layout.

    ``Writer(mngr, state, ema)`` compiles the :func:`pack` of trees shaped
    like ``state`` and ``ema`` on a background thread (while the first steps
    train).  ``save(step, state, ema, meta)`` dispatches the pack (an
    on-device copy, so the next steps may donate the originals) and starts
    :func:`save`, with ``meta["layout"]`` each item's :func:`layout`, which
    :func:`restore` checks.  It returns in milliseconds, on the calling
    thread: every process of a multi-host run saves at the same point of its
    sequence of collectives.
    """

    def __init__(self, mngr, state, ema):
        import jax

        self.mngr = mngr
        items = {"state": state, "ema": ema}
        self._layouts = {k: layout(v) for k, v in items.items()}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), items)
        pool = ThreadPoolExecutor(1, thread_name_prefix="jaxyolo-checkpoint-compile")
        self._pack = pool.submit(lambda: jax.jit(lambda t: {k: pack(v) for k, v in t.items()}).lower(abstract).compile())
        pool.shutdown(wait=False)

    def save(self, step: int, state, ema, meta: dict):
        packed = self._pack.result()({"state": state, "ema": ema})
        save(self.mngr, step, packed, {**meta, "layout": self._layouts})


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model and optimiser restoring it."""


def restore(mngr, step: int, **templates):
    """Restore the named items of checkpoint ``step`` into the structure of
    their templates: pytrees of replicated arrays whose sharding the
    restored arrays take (so a run saved on 4 devices resumes on 1 and vice
    versa).  A checkpoint of another model, optimiser or jaxyolo layout is a
    :class:`CheckpointError` naming the first tensor that differs."""
    import jax
    import orbax.checkpoint as ocp

    where = f"checkpoint {step} in {mngr.directory}"
    saved = restore_meta(mngr, step).get("layout")
    if saved is None:
        raise CheckpointError(f"{where} was written by an earlier jaxyolo (one orbax array per tensor); this version packs them (see jaxyolo.train.checkpoint): start a new run, or load it with the jaxyolo that wrote it")
    abstract, rebuild = {}, {}
    for name, t in templates.items():
        mine = layout(t)
        if saved.get(name) != mine:
            theirs = saved.get(name) or []
            diff = next(
                (f"tensor {a[0]} is {tuple(a[1])} {a[2]} in the checkpoint, {b[0]} {tuple(b[1])} {b[2]} here" for a, b in zip(theirs, mine) if a != b),
                f"{len(theirs)} tensors in the checkpoint, {len(mine)} here",
            )
            raise CheckpointError(f"{where}: its {name!r} does not fit this model/optimiser: {diff}")
        sharding = jax.tree.leaves(t)[0].sharding
        shapes = jax.eval_shape(pack, t)
        abstract[name] = {dt: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for dt, a in shapes.items()}
        out_shardings = jax.tree.map(lambda x: x.sharding, t)
        rebuild[name] = jax.jit(lambda p, t=t: unpack(p, t), out_shardings=out_shardings)
    got = mngr.restore(step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}))
    return {name: rebuild[name](got[name]) for name in templates}


def restore_meta(mngr, step: int) -> dict:
    import orbax.checkpoint as ocp

    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def find_run_dir(path) -> Path:
    """The run folder for ``path``: the folder itself, its ``checkpoints/`` or one checkpoint in it."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p
    if p.name == "checkpoints" and p.is_dir():
        return p.parent
    if p.parent.name == "checkpoints" and p.is_dir():
        return p.parent.parent
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (a run folder, or converted weights: a `jaxyolo convert` folder or a .pt/.pth file)")
    raise FileNotFoundError(f"no checkpoints under {p} (expected {p / 'checkpoints'})")


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
