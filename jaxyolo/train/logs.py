"""Run logs: ``steps.csv``, ``metrics.csv``, TensorBoard and ``results.png``.

The train step accumulates its logged values on the device
(:func:`jaxyolo.train.step.new_acc`); the loop fetches them only every
``log_every`` steps and at the end of each epoch, so no step waits for the
host.  ``steps.csv`` gets one row per fetch: ``step`` (the last step of the
window), ``epoch``, ``steps`` (the window's length) and the window's mean of
each value.  With ``log_every=1`` that is every step's own value.
``metrics.csv`` gets one row per epoch: the epoch's means, mAP, time.
Only process 0 writes.  :class:`Progress` shows the same log points on the
console: a bar on a terminal, one plain line each in a file or a pipe.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["Csv", "RunLogs", "Progress", "plot_results"]


class Csv:
    """Append-only CSV; ``keep`` filters the rows kept from an existing file (resume)."""

    def __init__(self, path: Path, fields, *, keep=None, enabled: bool = True):
        self.path, self.fields, self.enabled = path, list(fields), enabled
        if not enabled:
            return
        rows = []
        if keep is not None and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if keep(r)]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, rows):
        if not self.enabled or not rows:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerows(rows)


def _tensorboard(out_dir: Path):
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"))


class RunLogs:
    """The run's CSV files and TensorBoard writer.

    Args:
      out_dir: the run folder.
      names: the logged values (``loss``, the components, ``lr``, ``grad_norm``).
      done_step, done_epoch: on resume, rows after these are dropped (they
        belong to steps that will run again); None for a fresh run.
      enabled: False on every process but 0.
    """

    def __init__(self, out_dir: Path, names, *, done_step=None, done_epoch=None, enabled: bool = True):
        self.names = list(names)
        resume = done_step is not None
        self.steps = Csv(out_dir / "steps.csv", ["step", "epoch", "steps", *self.names], keep=(lambda r: int(r["step"]) <= done_step) if resume else None, enabled=enabled)
        epoch_fields = ["epoch", "step", *self.names, "map50", "map50_95", "precision", "recall", "coco_map50", "coco_map50_95", "epoch_s"]
        self.epoch_fields = epoch_fields
        self.metrics = Csv(out_dir / "metrics.csv", epoch_fields, keep=(lambda r: int(r["epoch"]) <= done_epoch) if resume else None, enabled=enabled)
        self.tb = _tensorboard(out_dir) if enabled else None

    def step_row(self, step: int, epoch: int, win: dict, n: int):
        row = {"step": step, "epoch": epoch, "steps": n, **{k: float(win[k]) / n for k in self.names}}
        self.steps.append([row])
        if self.tb is not None:
            for k in self.names:
                self.tb.add_scalar(f"train/{k}", row[k], step)
        return row

    def epoch_row(self, row: dict):
        self.metrics.append([row])
        if self.tb is not None and row.get("map50") is not None:
            self.tb.add_scalar("val/map50", row["map50"], row["epoch"])
            self.tb.add_scalar("val/map50_95", row["map50_95"], row["epoch"])
            if row.get("coco_map50") is not None:  # the last epoch's evaluation
                self.tb.add_scalar("val/coco_map50", row["coco_map50"], row["epoch"])
                self.tb.add_scalar("val/coco_map50_95", row["coco_map50_95"], row["epoch"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _bar_class(stream):
    """tqdm's class for ``stream``: its widget in Jupyter, its console bar
    on a terminal; None for a file or a pipe (a bar there is one long line
    of carriage returns)."""
    from tqdm.asyncio import tqdm as console
    from tqdm.auto import tqdm

    if tqdm is not console:  # a Jupyter kernel: a widget, nothing written to the stream
        return tqdm
    try:
        return tqdm if stream.isatty() else None
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return None


def _rate(rate) -> str:
    if rate is None:
        return "? it/s"
    return f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"


class Progress:
    """The console view of the steps, one epoch at a time.

    On a terminal (or in Jupyter) a tqdm bar per epoch; otherwise one plain
    line per log point (``step``, epoch, the window's values, rate, the
    epoch's ETA), no carriage returns; nothing when not ``enabled``.

    Both move only at log points, by the steps of the window just fetched.
    The loop waits for the device only there, so a count of dispatched
    steps runs ahead of the device and then stalls at the fetch: a rate per
    dispatch jumped between 1.9 it/s and 5 s/it.  Counted at the fetches,
    the steps are ones the device has finished, and the rate is their mean
    since the epoch's clock started (tqdm's ``smoothing=0``, the same sum
    for the plain lines): the ETA stays steady.  The loop starts the clock
    of an epoch whose first step compiles once that step has completed
    (:meth:`start` after it), so the compile is in neither.

    Args:
      epochs, steps_per_epoch: the run's.
      names: the values shown (keys of the rows given to :meth:`point`).
      enabled: False for ``--no-progress`` and on every process but 0.
      stream: where the bar or the lines go (default ``sys.stderr``, tqdm's).
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, names, enabled: bool = True, stream=None):
        self.epochs, self.steps_per_epoch, self.names, self.enabled = epochs, steps_per_epoch, list(names), enabled
        self.stream = sys.stderr if stream is None else stream
        self._bar_class = _bar_class(self.stream) if enabled else None
        self._bar = self._epoch = None
        self._t0 = self._n0 = None

    @property
    def running(self) -> bool:
        """Whether an epoch's clock runs (between :meth:`start` and :meth:`end`)."""
        return self._epoch is not None

    def start(self, epoch: int, position: int):
        """Start the clock of ``epoch`` (0-based), ``position`` of its steps done."""
        self.end()
        self._epoch, self._t0, self._n0 = epoch, time.perf_counter(), position
        if self._bar_class is not None:
            self._bar = self._bar_class(
                total=self.steps_per_epoch, initial=position, desc=f"epoch {epoch + 1}/{self.epochs}", file=self.stream,
                dynamic_ncols=True, smoothing=0, mininterval=0, miniters=1,
            )

    def point(self, position: int, step: int, row: dict):
        """A log point: ``position`` steps of the epoch done, ``step`` in all,
        ``row`` the window's means."""
        if not self.enabled:
            return
        values = {k: f"{row[k]:.4g}" for k in self.names}
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
            self._bar.update(position - self._bar.n)
            return
        from tqdm import tqdm

        elapsed = time.perf_counter() - self._t0
        rate = (position - self._n0) / elapsed if position > self._n0 and elapsed > 0 else None
        eta = tqdm.format_interval((self.steps_per_epoch - position) / rate) if rate else "?"
        shown = "  ".join(f"{k} {v}" for k, v in values.items())
        print(f"step {step}  epoch {self._epoch + 1}/{self.epochs} ({position}/{self.steps_per_epoch})  {shown}  {_rate(rate)}  ETA {eta}", file=self.stream, flush=True)

    def end(self):
        """Stop the epoch's clock (and close its bar)."""
        if self._bar is not None:
            self._bar.close()
        self._bar = self._epoch = None


def plot_results(out_dir: Path, loss_names):
    """``results.png``: logged loss curves and mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out_dir / "steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    with (out_dir / "metrics.csv").open() as f:
        epochs = list(csv.DictReader(f))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.asarray([int(r["step"]) for r in steps])
    for name in ("loss", *loss_names):
        y = np.asarray([float(r[name]) for r in steps])
        k = max(1, min(25, len(y) // 10))
        ys = np.convolve(y, np.ones(k) / k, mode="valid") if len(y) >= k else y
        a1.plot(x[len(x) - len(ys):], ys, label=name)
    a1.set_xlabel("step")
    a1.set_ylabel("loss (mean over each logged window)")
    a1.set_yscale("log")
    a1.legend()
    ev = [r for r in epochs if r.get("map50")]
    a2.plot([int(r["epoch"]) for r in ev], [float(r["map50"]) for r in ev], "o-", label="mAP50 (yolo val)")
    a2.plot([int(r["epoch"]) for r in ev], [float(r["map50_95"]) for r in ev], "s-", label="mAP50-95 (yolo val)")
    if any(r.get("coco_map50") for r in ev):
        a2.plot([int(r["epoch"]) for r in ev if r.get("coco_map50")], [float(r["coco_map50"]) for r in ev if r.get("coco_map50")], "o--", label="COCO mAP@0.5")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 1)
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=100)
    plt.close(fig)
