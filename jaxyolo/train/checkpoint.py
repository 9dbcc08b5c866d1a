"""Run folders: orbax checkpoints, the writer's lock, and loading a saved run.

``out_dir/checkpoints/<step>/`` holds three orbax items: ``state`` (params,
BatchNorm stats, optimiser state, step), ``ema`` (EMA params + stats) and
``meta`` (config, epoch, step in epoch, the partial epoch sums of the logged
values, history, class names).  orbax writes into a temporary directory and
renames it when complete, so a process killed in the middle of a save leaves
the previous checkpoint as the latest one.  Every process calls
:func:`save`/:func:`restore` (orbax coordinates a multi-host write: the
replicated arrays and the JSON are written once).  Saves are asynchronous:
:func:`save` returns once the arrays are copied to host memory (so the next
step may reuse their device buffers) and the files are written by a
background thread while training goes on; the next save, and
:func:`finish` at the end of a run, wait for it.

:class:`RunLock` makes a run folder single-writer: a second process training
into the same ``--out`` is refused with the holder's pid and host.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

__all__ = ["RunLock", "RunLockedError", "manager", "save", "finish", "restore", "restore_meta", "find_run_dir"]


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive ``fcntl`` lock on ``out_dir/.lock`` for the duration of a run.

    The kernel drops the lock when the holder exits, however it exits
    (``kill -9`` included), so a stale lock never blocks a later resume.
    The file records the holder (pid, host, start time) for the error
    message of a second writer.
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / ".lock"
        self._fd = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by {holder}; wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {now})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
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


def save(mngr, state, ema, meta: dict):
    """Start writing checkpoint ``state["step"]`` (atomically, in the
    background: see the module docstring)."""
    import orbax.checkpoint as ocp

    step = int(state["step"])
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), ema=ocp.args.StandardSave(ema), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def finish(mngr):
    """Wait for the last checkpoint write and release the manager."""
    mngr.wait_until_finished()
    mngr.close()


def restore(mngr, step: int, **templates):
    """Restore the named items of checkpoint ``step``; each template is a
    pytree of arrays whose shardings the restored arrays take (so a run saved
    on 4 devices resumes on 1 and vice versa)."""
    import orbax.checkpoint as ocp

    args = {k: ocp.args.StandardRestore(t) for k, t in templates.items()}
    return mngr.restore(step, args=ocp.args.Composite(**args))


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
    raise FileNotFoundError(f"no checkpoints under {p} (expected {p / 'checkpoints'})")


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
