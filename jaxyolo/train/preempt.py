"""Preemption: SIGTERM or SIGINT stops a run at a step boundary, with a checkpoint.

Spot VMs, preemptible TPUs and SLURM preemption send SIGTERM and give the
process some seconds (about 30 on Cloud TPU and GCE spot) before SIGKILL.
While :func:`jaxyolo.train.train` runs, :class:`StopSignals` turns the first
SIGTERM or SIGINT (Ctrl-C) into a request: the loop finishes the step it is
in, writes a checkpoint at the next step boundary, waits for the write,
prints where it stopped, and the command exits with
:data:`PREEMPTED_EXIT_CODE`; ``--resume`` continues exactly (the next step's
loss is the one an uninterrupted run computes).  A second signal while it
stops is reported and changes nothing: the checkpoint being written is
completed.  Even a SIGKILL during the write loses only that checkpoint:
orbax writes into a temporary folder and renames it when complete, so the
previous checkpoint stays the latest (:mod:`jaxyolo.train.checkpoint`).

Several processes (a multi-host run) must stop at the same step: every
collective of the step is joint, so a process that stops alone leaves the
others waiting forever.  ``jax.distributed.initialize`` starts JAX's
preemption service: its SIGTERM handler notifies the coordination service,
which tells every process; the processes exchange their step counters and
:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
returns True at the same step on all of them (the largest counter plus
one).  There SIGTERM is left to that service, and SIGINT is forwarded to it
(the process sends itself a SIGTERM).  With the service disabled
(``jax_enable_preemption_service=False``) a multi-process run installs no
handler: the signals act as without jaxyolo.

The handlers are installed only from the main thread (Python's rule for
``signal.signal``), for the training loop: from the first step (its
compile included) to the last; the previous ones are restored after it.
"""

from __future__ import annotations

import os
import signal

__all__ = ["PREEMPTED_EXIT_CODE", "StopSignals"]

#: Exit status of ``jaxyolo train`` stopped by SIGTERM/SIGINT with a
#: checkpoint: ``EX_TEMPFAIL`` of ``sysexits.h`` ("try again later"), not the
#: 143 / 130 of a process killed by the signal, so a scheduler or a wrapper
#: script can tell a resumable stop from a crash (1) and a finished run (0).
PREEMPTED_EXIT_CODE = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _sync_manager():
    """JAX's preemption sync manager when this process is part of a
    ``jax.distributed`` run with the preemption service on, else None."""
    import jax
    from jax._src import distributed

    if not jax.distributed.is_initialized():
        return None
    return distributed.global_state.preemption_sync_manager


def _say(msg: str) -> None:
    """One line on stderr from a signal handler: ``os.write``, not ``print``
    (a handler that prints while the interrupted code prints to the same
    buffered stream raises "reentrant call")."""
    os.write(2, (msg + "\n").encode())


class StopSignals:
    """SIGTERM/SIGINT as a request to stop at a step boundary (see the module docstring).

    ``with StopSignals() as stop:`` then, after every training step (every
    process, every step, the same sequence of ``step`` values),
    ``stop.reached(step)``: True at the step where every process stops.
    :attr:`signal` names the signal this process received (None if it got
    none: in a multi-process run another process may have).
    """

    def __init__(self):
        self.signal: str | None = None
        self._sync = None
        self._previous = {}

    def __enter__(self):
        import threading

        import jax

        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works from the main thread only: no handler
        self._sync = _sync_manager()
        if self._sync is None and jax.process_count() > 1:
            return self  # no way to agree on a step: leave the signals alone
        for s in _SIGNALS:
            if s == signal.SIGTERM and self._sync is not None:
                continue  # the preemption service's own handler (jax.distributed.initialize)
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        self.restore()

    def restore(self):
        """Put the previous handlers back (again: a no-op)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            _say(f"{name} again: still stopping at the next step boundary with a checkpoint (the checkpoint being written is completed; the previous one stays intact even after a kill -9)")
            return
        self.signal = name
        _say(f"{name}: stopping after the current step with a checkpoint; the run continues with --resume")
        if self._sync is not None:  # SIGINT: to the preemption service, which tells every process
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether the run stops after ``step`` (global steps done): in one
        process as soon as a signal came; in several, at the step the
        preemption service agreed on (it must see every step)."""
        if self._sync is not None:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None
