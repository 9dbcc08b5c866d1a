"""The training loop: a pipeline, a step, a logger and checkpoints.

Layout of ``out_dir``::

    checkpoints/<step>/   orbax: state, EMA, meta (see jaxyolo.train.checkpoint)
    config.json           the run's TrainConfig
    steps.csv             one row per logged window (every ``log_every`` steps)
    metrics.csv           one row per epoch: mean losses, lr, mAP, time
    results.png           loss curves and mAP per epoch
    final.json            final mAP, steps, seconds
    .lock                 while a process trains into the folder (left: one was killed)

The loop never waits for the device between steps: batches are gathered and
transferred on a background thread (:class:`jaxyolo.data.pipeline.Prefetcher`),
the step is dispatched asynchronously, and the logged values stay on the
device until a log point (every ``log_every`` steps, each epoch's end, a stop).
A non-finite loss is caught at the next log point, before any checkpoint, and
stops the run naming the first bad step.

The console: "compiling the train step..." before the first step (one
compile: the epochs without mosaic run the mosaic epochs' step on padded
batches), which the loop waits for, so
the progress clock starts after the compile; then a bar per epoch on a
terminal, or one line per log point in a file or a pipe
(:class:`jaxyolo.train.logs.Progress`); at the end the final mAP and the run
folder's absolute path with what it holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from jaxyolo import parallel
from jaxyolo.data import DataError, load_data
from jaxyolo.data.formats import discover
from jaxyolo.data.images import load_split
from jaxyolo.data.pipeline import Prefetcher, TrainBatches
from jaxyolo.data.stream import CACHES, DecodePool, choose_cache, default_cache_dir, default_workers, open_split
from jaxyolo.evaluate import eval_max_det, evaluate_model, format_val_table
from jaxyolo.train import checkpoint as ckpt
from jaxyolo.train.config import TrainConfig
from jaxyolo.train.logs import Progress, RunLogs, plot_results
from jaxyolo.train.preempt import StopSignals
from jaxyolo.train.step import Session, main_loss_names, new_acc

__all__ = ["train", "evaluate_checkpoint", "load_session", "check_img_size", "check_classes"]


def _open_data(config: TrainConfig, *, cache: str, cache_dir, workers, ring: int, stack):
    """The run's ``(train, val)`` splits and how their images come: ``(train,
    val, how)``, ``how`` the words for the run's first line.  The embedded
    set is rendered in RAM; a dataset on disk is indexed (no image opened)
    and its images stream from decode workers (``cache`` "none"), fill a RAM
    buffer as batches first ask for them ("ram"), or are decoded up front
    into a memory-mapped file in ``cache_dir`` ("disk";
    :func:`jaxyolo.data.load_data`).  "auto" picks "ram" or "none"
    (:func:`jaxyolo.data.stream.choose_cache`)."""
    if config.data == "embedded":
        kw = dict(img_size=config.img_size, nc=config.nc)
        return load_data("embedded", "train", embedded_size=config.train_size, **kw), load_data("embedded", "val", embedded_size=config.val_size, **kw), "embedded, rendered in RAM"
    specs = [discover(config.data, split, images=config.images, nc=config.nc) for split in ("train", "val")]
    if specs[1].names != specs[0].names:
        raise DataError(f"{config.data}: the val split's classes {specs[1].names[:5]}... differ from the train split's {specs[0].names[:5]}...")
    mode, why = choose_cache(cache, n_images=sum(len(sp) for sp in specs), img_size=config.img_size)
    if mode == "disk":
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(config.data)
        splits = tuple(load_split(sp, img_size=config.img_size, cache=folder / f"{split}-{config.img_size}.npy") for sp, split in zip(specs, ("train", "val")))
        return (*splits, f"cache=disk ({folder}, decoded up front)")
    workers = default_workers() if workers is None else workers
    pool = stack.enter_context(DecodePool(workers))
    splits = tuple(open_split(sp, img_size=config.img_size, pool=pool, cache=mode, ring=ring) for sp in specs)
    for sp in splits:
        stack.callback(sp.close)
    return (*splits, f"cache={mode}{' (auto: ' + why + ')' if cache == 'auto' else ''}, {workers} decode worker{'s' * (workers != 1)}")


def default_max_boxes(data) -> int:
    """M when none is given: the most objects in one training image rounded
    up to a multiple of 8, at least 32 (a mosaic holds 4 images' boxes)."""
    return max(32, -(-data.max_objects() // 8) * 8)


def _report_failures(data, log):
    """One warning line for the images of a streamed split found unreadable since the last call."""
    take = getattr(getattr(data, "images", None), "take_failures", None)
    bad = take() if take is not None else []
    if bad:
        shown = ", ".join(f"{Path(f).name} ({why})" for f, why in bad[:3])
        more = f", and {len(bad) - 3} more" if len(bad) > 3 else ""
        log(f"warning: {len(bad)} image{'s' * (len(bad) != 1)} cannot be read ({len(data.failed)} in all so far); each trains as an empty frame and is left out of the mAP: {shown}{more}")


def _evaluate(session: Session, val_data, *, batch_size=None, log=None, rect: bool = False, coco: bool = True):
    """The trainer validates square frames (as ultralytics' trainer); ``jaxyolo
    eval`` passes ``rect=True`` (as ``yolo val``).  ``coco=False``: without
    pycocotools' mAP (the trainer's evaluations before the last)."""
    m = session.config.max_boxes or default_max_boxes(val_data)  # None: converted weights, no run's M
    d = eval_max_det(session.config.max_det, val_data)
    res = evaluate_model(
        lambda p, s, im: session.predict(p, s, im, d), session.ema["params"], session.ema["stats"], val_data,
        batch_size=batch_size or session.config.batch, max_boxes=m, sharding=session.batch_sharding, warn=log,
        rect=rect, stride=int(max(session.strides)), coco=coco,
    )
    if log is not None:
        _report_failures(val_data, log)
    return res


def map_line(ev: dict) -> str:
    """``mAP50 0.8731  mAP50-95 0.6580 (yolo val)  COCO mAP@0.5 0.8223  mAP@0.5:0.95 0.6290``:
    the headline (``yolo val``'s metric) and pycocotools' on the same
    detections (left out where it was not computed)."""
    line = f"mAP50 {ev['map50']:.4f}  mAP50-95 {ev['map50_95']:.4f} (yolo val)"
    if ev.get("coco_map50") is None:
        return line
    return line + f"   COCO mAP@0.5 {ev['coco_map50']:.4f}  mAP@0.5:0.95 {ev['coco_map50_95']:.4f}"


def _print(msg: str):
    """``print`` flushed: in a pipe, the lines keep their order with the
    progress lines on stderr."""
    print(msg, flush=True)


def _first_step(session: Session, args, *, log):
    """``session.train_step(*args)`` for the run's first batch: it compiles.
    Waits for it, so that the progress clock starts after the compile."""
    log("compiling the train step...")
    t = time.perf_counter()
    out = session.train_step(*args)
    jax.block_until_ready(out[2])
    log(f"first step done in {time.perf_counter() - t:.1f} s")
    return out


def _contents(out_dir: Path) -> str:
    """The run folder's top-level entries, folders with a ``/``; not the
    ``.lock``, which goes when :func:`train` returns."""
    return ", ".join(p.name + "/" * p.is_dir() for p in sorted(out_dir.iterdir()) if p.name != ".lock")


def train(
    config: TrainConfig, out_dir, *, resume: bool = False, progress: bool = True, log=_print, data=None,
    log_every: int = 50, devices: int | None = None, prefetch: int = 2, cache: str = "auto", cache_dir=None,
    workers: int | None = None, header: str | None = None, save_every: int | None = None,
):
    """Train, evaluate every ``eval_every`` epochs, checkpoint every epoch
    (and every ``save_every`` steps); stop with a checkpoint on SIGTERM or
    SIGINT (:mod:`jaxyolo.train.preempt`).

    Args:
      config: the run's :class:`TrainConfig` (with ``resume`` the saved one is
        used; only ``max_steps`` may change).  ``max_boxes=None`` becomes
        :func:`default_max_boxes` of the training split (saved resolved).
      out_dir: run folder (created after the inputs validate).
      resume: continue from the latest checkpoint in ``out_dir``; the next
        step sees the same batch, parameters, optimiser and EMA state as an
        uninterrupted run, so its loss is identical (with any ``cache`` and
        ``workers``).
      progress: show a progress bar on a terminal, one line per log point
        otherwise (see :class:`jaxyolo.train.logs.Progress`); False: neither.
      log: where summary lines go (the compile lines too, on process 0).
      data: optional ``(train, val)`` :class:`DetectionData` (else loaded from ``config``).
      log_every: fetch the logged values every this many steps (a device
        sync); they never change the training itself.
      devices: use the first N local devices (None: all devices of all processes).
      prefetch: batches gathered and transferred ahead of the step (>= 1);
        a streamed dataset's decodes run ``max(prefetch, 2)`` batches ahead.
      cache: how the images of a dataset on disk reach the batches:
        ``"auto"`` (default), ``"ram"``, ``"disk"`` or ``"none"`` (streamed);
        see :func:`_open_data`.
      cache_dir: the folder of ``cache="disk"`` (default
        :func:`jaxyolo.data.stream.default_cache_dir`).
      workers: decode processes of a streamed dataset (default
        :func:`jaxyolo.data.stream.default_workers`; 0: decode on the
        prefetch thread).
      header: the run's first line, to which the data source is appended
        (the CLI's ``jaxyolo train: ...``); None: no such line.
      save_every: also write a checkpoint every this many global steps
        (long epochs on preemptible machines); None: at each epoch's end only.
        Two checkpoints are kept.

    Returns:
      dict with the final evaluation of :func:`jaxyolo.evaluate.evaluate_model`
      (``map50``, ``map50_95`` as ``yolo val``, ``coco_map50``, ``coco_map50_95``
      by pycocotools, ...; EMA model, val split; ``map50`` and ``map50_95`` None
      when stopped early by ``max_steps``), ``steps`` (global steps done),
      ``losses`` (the per-step ``loss`` of every step this call ran),
      ``log_times`` (``(step, seconds since the call began)`` at each log
      point), ``seconds``, ``out_dir``, ``preempted`` (None, or what stopped
      the run at step ``steps`` with a checkpoint: ``"SIGTERM"``,
      ``"SIGINT"``, or ``"preemption notice"`` when another process of a
      multi-process run got the signal; ``map50`` is then None).  Called
      from the main thread, the signals are caught from the first training
      step (its compile included) to the end of the last epoch (a signal
      during the last epoch's evaluation lets the run finish; one during
      the set-up acts as without jaxyolo: there is no training to lose);
      from another thread, not at all.
    """
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if save_every is not None and (not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 1):
        raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
    t_start = time.perf_counter()
    parallel.init_distributed()
    primary = jax.process_index() == 0
    out_dir = Path(out_dir)
    where = out_dir.absolute()  # in messages: the user may have started elsewhere (scripts/train.sh cds)
    mesh = parallel.make_mesh(devices)
    with contextlib.ExitStack() as stack:
        meta = lock = None
        if resume:
            if not (out_dir / "checkpoints").is_dir():
                raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
            if primary:
                lock = stack.enter_context(ckpt.RunLock(out_dir))
            mngr = ckpt.manager(out_dir)
            latest = mngr.latest_step()
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
            meta = ckpt.restore_meta(mngr, latest)
            config = dataclasses.replace(TrainConfig.from_json(meta["config"]), max_steps=config.max_steps)
        # Validate every input before the first write into out_dir.
        parallel.check_batch(config.batch, mesh)
        per_process = config.batch // jax.process_count()
        ahead = max(prefetch, 2)
        if data is not None:
            (train_data, val_data), how = data, "data given in memory"
        else:
            # the frames of every request in flight (4: a mosaic's), plus the recent samples a mosaic_buffer draws from
            ring = (ahead + 2) * per_process * 4 + config.mosaic_buffer * config.batch
            train_data, val_data, how = _open_data(config, cache=cache, cache_dir=cache_dir, workers=workers, ring=ring, stack=stack)
        if header is not None and primary:
            log(f"{header}  data: {how}")
        most = train_data.max_objects()
        if config.max_boxes is None:
            config = dataclasses.replace(config, max_boxes=default_max_boxes(train_data))
        elif config.max_boxes < most and not resume and primary:
            log(f"warning: max_boxes={config.max_boxes} is below the {most} objects of the most crowded training image: the boxes beyond it are cut (counted in boxes_cut)")
        batches = TrainBatches(
            train_data, batch_size=config.batch, max_boxes=config.max_boxes, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), mosaic_buffer=config.mosaic_buffer,
        )
        spe = batches.steps_per_epoch
        if not resume:
            if primary:
                lock = stack.enter_context(ckpt.RunLock(out_dir))
            mngr = ckpt.manager(out_dir)
        if lock is not None and lock.stale:
            log(f"{where}: the .lock of {lock.stale} was left behind (that process was killed or crashed); taken over")
        stack.callback(ckpt.finish, mngr)  # before the lock goes (callbacks run last-in first-out)
        if primary:
            (out_dir / "config.json").write_text(config.dumps())

        nc = train_data.nc
        session = Session(config, nc=nc, steps_per_epoch=spe, mesh=mesh, log_every=log_every, log=None if resume else log, train_images=len(train_data))
        names = main_loss_names(config.loss, session.reg_max)
        history, epoch, start = [], 0, 0
        acc = new_acc(session.names, log_every)
        if meta is not None:
            restored = ckpt.restore(mngr, latest, state=session.state, ema=session.ema)
            session.state, session.ema = restored["state"], restored["ema"]
            epoch, start, history = meta["epoch"], meta["step_in_epoch"], meta["history"]
            if meta.get("epoch_n"):  # resumed mid-epoch: the epoch's row averages all its steps
                acc["epoch"] = {k: np.float32(meta["epoch_sums"][k]) for k in session.names}
                acc["epoch_n"] = np.int32(meta["epoch_n"])
        done = int(session.state["step"])

        def meta_now(ep, st, sums=None, n=0):
            return {
                "config": config.to_json(), "epoch": ep, "step_in_epoch": st, "data_seed": config.seed, "history": history,
                "nc": nc, "names": list(train_data.names), "epoch_sums": {k: float(v) for k, v in (sums or {}).items()}, "epoch_n": int(n),
            }

        def result(ev, losses, log_times, preempted=None):
            ev = ev or {"map50": None, "map50_95": None}
            return {**ev, "steps": done, "losses": losses, "log_times": log_times, "seconds": time.perf_counter() - t_start, "out_dir": str(out_dir), "preempted": preempted}

        if meta is not None and epoch >= config.epochs:
            log(f"{where}: the run is complete ({config.epochs} epochs, {done} steps); re-evaluating its EMA model")
            ev = _evaluate(session, val_data, log=log)
            log(f"val {map_line(ev)}   ({done} steps)")
            if primary and not (out_dir / "final.json").exists():  # stopped by a signal after its last step
                ckpt.write_json(out_dir / "final.json", {**ev, "steps": done, "seconds": None})
            return result(ev, [], [])
        if config.max_steps is not None and done >= config.max_steps:
            log(f"{where}: already at step {done} >= max_steps={config.max_steps}; nothing to train")
            return result(None, [], [])
        if meta is not None:
            log(f"resumed {where} at step {done} (epoch {epoch + 1}/{config.epochs}, batch {start + 1}/{spe})")

        writer = ckpt.Writer(mngr, session.state, session.ema)
        logs = RunLogs(out_dir, session.names, done_step=done if resume else None, done_epoch=epoch if resume else None, enabled=primary)
        stack.callback(logs.close)
        state, ema = session.state, session.ema
        acc = jax.device_put(acc, session.replicated)
        losses, log_times, last_eval = [], [], None
        t_epoch = time.perf_counter()
        positions = batches.positions(epoch, start, epochs=config.epochs, max_steps=config.max_steps, done=done)
        host = batches.stream(positions, mosaic_of=config.mosaic_in_epoch, ahead=ahead)
        stream = stack.enter_context(Prefetcher(host, sharding=session.batch_sharding, depth=prefetch))
        view = Progress(epochs=config.epochs, steps_per_epoch=spe, names=("loss", *names), enabled=progress and primary)
        stack.callback(view.end)
        say = log if primary else (lambda *_: None)
        # One compiled step per run: a run with mosaic epochs steps its epochs
        # without mosaic (close_mosaic) as K = 4 batches without partners, the
        # same augmentation bit for bit (jaxyolo.data.augment.pad_to_mosaic);
        # a run without any has K = 1 batches throughout.
        pad = config.mosaic > 0 and config.epochs > config.close_mosaic
        compiled = False
        preempted = False
        stop = stack.enter_context(StopSignals())  # from the first step to the last (see the docstring)
        for (ep, k), batch in stream:
            if pad and not config.mosaic_in_epoch(ep):
                batch = session.pad_to_mosaic(batch)
            if compiled:
                if not view.running:
                    view.start(ep, k)
                state, ema, acc = session.train_step(state, ema, acc, batch)
            else:
                state, ema, acc = _first_step(session, (state, ema, acc, batch), log=say)
                compiled = True
                view.start(ep, k + 1)  # the compile counts in neither the rate nor the ETA
            done += 1
            end_of_epoch = k + 1 == spe
            preempted = stop.reached(done)  # every process, every step (a multi-process run agrees on the step)
            stopping = preempted or (config.max_steps is not None and done >= config.max_steps)
            saving = stopping or (save_every is not None and done % save_every == 0)
            if not (done % log_every == 0 or end_of_epoch or saving):
                continue
            # ---- log point: the only place the loop waits for the device.
            a = parallel.fetch(acc)
            if int(a["bad_step"]):
                raise FloatingPointError(f"non-finite loss at step {int(a['bad_step'])} (detected at step {done}): the run stops; last checkpoint in {where / 'checkpoints'}")
            n = int(a["n"])
            losses.extend(a["losses"][:n].tolist())
            row = logs.step_row(done, ep + 1, a["win"], n)
            log_times.append((done, time.perf_counter() - t_start))
            view.point(k + 1, done, row)
            fresh = new_acc(session.names, log_every)
            session.state, session.ema = state, ema
            if end_of_epoch:
                view.end()
                _report_failures(train_data, say)
                epoch = ep + 1
                erow = {"epoch": epoch, "step": done, **{k2: float(a["epoch"][k2]) / int(a["epoch_n"]) for k2 in session.names}, "epoch_s": round(time.perf_counter() - t_epoch, 2)}
                due = epoch % config.eval_every == 0 or epoch == config.epochs
                if due and preempted:
                    say(f"epoch {epoch}: evaluation skipped (stopping); --resume evaluates at the end of the run")
                elif due:
                    # pycocotools' COCO mAP only at the last epoch: it costs as
                    # much as the rest of a small evaluation, and ultralytics'
                    # trainer reports yolo val's metric per epoch too.
                    last_eval = _evaluate(session, val_data, log=say, coco=epoch == config.epochs)
                    erow.update(last_eval)
                    if progress and primary:
                        log(f"epoch {epoch}: val {map_line(last_eval)}")
                history.append({k2: erow.get(k2) for k2 in logs.epoch_fields})
                logs.epoch_row(erow)
                writer.save(done, state, ema, meta_now(epoch, 0))
                t_epoch = time.perf_counter()
            else:
                fresh["epoch"], fresh["epoch_n"] = a["epoch"], a["epoch_n"]
                if saving:
                    writer.save(done, state, ema, meta_now(ep, k + 1, a["epoch"], a["epoch_n"]))
            acc = jax.device_put(fresh, session.replicated)
            if preempted:
                break
        stop.restore()
        view.end()
        session.state, session.ema = state, ema
        if preempted:
            mngr.wait_until_finished()  # the checkpoint is on disk before the process may be killed
            why = stop.signal or "preemption notice"
            log(f"stopped by {why} at step {done} (epoch {ep + 1}/{config.epochs}, batch {k + 1}/{spe}); checkpoint in {where / 'checkpoints' / str(done)}; continue with --resume")
            return result(None, losses, log_times, preempted=why)
        if done < config.epochs * spe:  # stopped by max_steps
            log(f"stopped at step {done} (max_steps); checkpoint in {where / 'checkpoints'}")
            return result(None, losses, log_times)
        if last_eval is None:
            last_eval = _evaluate(session, val_data, log=say)
        secs = time.perf_counter() - t_start
        if primary:
            try:
                plot_results(out_dir, names)
            except Exception as e:  # a plot must never lose a finished run
                log(f"warning: could not write results.png: {e}")
            mngr.wait_until_finished()  # final.json only after the last checkpoint is on disk
            ckpt.write_json(out_dir / "final.json", {**last_eval, "steps": done, "seconds": secs})
        log(f"val {map_line(last_eval)}   ({done} steps, {secs:.0f} s)")
        # Process 0 wrote the folder; another host may not see it (a local --out).
        log(f"run folder: {where}" + (f"  ({_contents(out_dir)})" if primary else ""))
        return result(last_eval, losses, log_times)


def check_img_size(img_size) -> int | None:
    """``img_size``, the side S in pixels of the square frame the images are
    letterboxed to and the model runs at: None (a default applies) or a
    positive multiple of 32 (the largest stride).  Returns it unchanged;
    raises ValueError naming ``--img-size`` otherwise."""
    if img_size is None:
        return None
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 32 or img_size % 32:
        raise ValueError(f"--img-size must be a positive multiple of 32, got {img_size!r}")
    return img_size


CONVERTED_IMG_SIZE = 640  # converted weights run at upstream's default (`yolo val`, `yolo predict`)


def _open(path, *, img_size: int | None = None, nms: bool | None = None):
    """What :func:`load_session` loads, up to the model: ``(config, meta,
    build)`` with ``build(mesh) -> Session`` building the model (the slow
    part), so that the inputs can be checked first."""
    img_size = check_img_size(img_size)
    if nms is not None and not isinstance(nms, bool):
        raise ValueError(f"nms must be a bool or None, got {nms!r}")
    p = Path(path)
    if p.is_file() or (p / "model.json").is_file():
        from jaxyolo.models import load_weights

        src = load_weights(p)
        config = TrainConfig(model=src.name, weights=str(p), img_size=img_size or CONVERTED_IMG_SIZE, batch=8, nms=bool(nms))
        names = list(src.class_names) if src.class_names else [str(i) for i in range(src.nc)]
        meta = {"names": names, "has_names": bool(src.class_names), "nc": src.nc, "step": 0, "converted": True}
        return config, meta, lambda mesh: Session(config, nc=src.nc, steps_per_epoch=1, mesh=mesh)
    run = ckpt.find_run_dir(path)
    mngr = ckpt.manager(run)
    latest = mngr.latest_step()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'}")
    meta = ckpt.restore_meta(mngr, latest)
    config = TrainConfig.from_json(meta["config"])
    if img_size is not None:  # the parameters do not depend on the size
        config = dataclasses.replace(config, img_size=img_size)
    if nms is not None:
        config = dataclasses.replace(config, nms=nms)

    def build(mesh):
        session = Session(config, nc=meta["nc"], steps_per_epoch=max(1, config.train_size // config.batch), mesh=mesh)
        session.ema = ckpt.restore(mngr, latest, ema=session.ema)["ema"]
        return session

    return config, {**meta, "has_names": True, "step": latest}, build


def load_session(path, *, devices: int | None = None, img_size: int | None = None, nms: bool | None = None):
    """The model to evaluate or run: ``(session, meta)``.

    ``path`` is a run folder (the EMA model of its latest checkpoint;
    ``meta["step"]`` the checkpoint's step), or converted weights (a
    ``jaxyolo convert`` folder or an upstream ``.pt``/``.pth``: the model as
    loaded; ``meta["step"] = 0``, ``meta["converted"] = True``).
    ``meta["names"]`` are the class names (``"0"``, ``"1"``, ... for weights
    that carry none: then ``meta["has_names"]`` is False).

    ``img_size`` (S, pixels, a positive multiple of 32; :func:`check_img_size`)
    is the size the model runs at, ``session.config.img_size``: the square
    frame the images are letterboxed to.  None: 640 for converted weights (as
    upstream), a run's training size for a run.

    ``nms``: end-to-end models (YOLO26, YOLOv10): True detects with the
    one-to-many branch and NMS, False with the one-to-one branch's top-k (no
    NMS); None: the run's ``config.nms`` (False for converted weights).
    """
    _, meta, build = _open(path, img_size=img_size, nms=nms)
    return build(parallel.make_mesh(devices)), meta


def check_classes(model_names, data_names, *, has_names: bool = True) -> None:
    """The model's classes against a dataset's: the same number, and when the
    model carries names (``has_names``), the same names in the same order.
    Raises :class:`DataError` naming the first difference."""
    ours, theirs = tuple(model_names), tuple(data_names)
    if len(ours) != len(theirs):
        raise DataError(f"the checkpoint's {len(ours)} classes {ours[:5]} differ from the dataset's {len(theirs)} {theirs[:5]}")
    if has_names and ours != theirs:
        i = next(k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise DataError(f"the checkpoint's {len(ours)} classes differ from the dataset's: class {i} is {ours[i]!r} in the checkpoint, {theirs[i]!r} in the dataset")


def evaluate_checkpoint(
    path, *, log=print, batch_size: int | None = None, data=None, devices: int | None = None, images=None, img_size: int | None = None,
    workers: int | None = None, rect: bool = True, nms: bool | None = None,
):
    """Evaluate the model of ``path`` (a run's latest EMA model, or converted
    weights: see :func:`load_session`) on the val split of the run's data, or
    of ``data`` (a dataset spec as ``TrainConfig.data``, with ``images`` for a
    COCO ``.json``, or a :class:`DetectionData`; required for converted
    weights).

    ``img_size``: S in pixels (a positive multiple of 32): the val images are
    letterboxed to S x S and the model runs at S.  None: the run's training
    size, 640 for converted weights.  A given :class:`DetectionData` is
    already letterboxed: its size must then be S.

    ``rect`` (default): rectangular batches as ``yolo val`` (each batch of
    images sorted by aspect ratio in a frame of ``ceil(shape * S / stride +
    0.5) * stride``, :mod:`jaxyolo.evaluate.model`), so the figures compare
    with ``yolo val``'s; False: the square S x S frames of the trainer's
    evaluation (the numbers of the run's ``final.json``).  One process only
    (on several, square).

    A dataset on disk is streamed (its images decoded batch by batch by
    ``workers`` processes, :func:`jaxyolo.data.stream.default_workers` by
    default), never held in RAM whole.

    ``nms``: as :func:`load_session`.

    Logs ``yolo val``'s table (all classes, then each class) and ``<path>
    (step N | converted weights, S px): val mAP50 ... (yolo val)   COCO ...``.
    Returns the dict of :func:`jaxyolo.evaluate.evaluate_model`."""
    config, meta, build = _open(path, img_size=img_size, nms=nms)
    mesh = parallel.make_mesh(devices)
    if batch_size is not None:
        parallel.check_batch(batch_size, mesh)
    if data is None and meta.get("converted"):
        raise ValueError(f"{path} holds converted weights, not a run: pass the dataset to evaluate on (--data)")
    with contextlib.ExitStack() as stack:
        if data is None or isinstance(data, str):
            spec, imgs = (config.data, config.images) if data is None else (data, images)
            if spec == "embedded":
                val_data = load_data(spec, "val", img_size=config.img_size, embedded_size=config.val_size)
            else:  # streamed: a COCO-sized val split never sits in RAM whole
                pool = stack.enter_context(DecodePool(default_workers() if workers is None else workers))
                val_data = open_split(discover(spec, "val", images=imgs), img_size=config.img_size, pool=pool, cache="none", ring=2 * (batch_size or config.batch))
                stack.callback(val_data.close)
        else:
            val_data = data
            if img_size is not None and val_data.img_size != img_size:
                raise ValueError(f"img_size={img_size}, but data is letterboxed to {val_data.img_size} px")
        check_classes(meta["names"], val_data.names, has_names=meta["has_names"])  # before the model is built
        res = _evaluate(build(mesh), val_data, batch_size=batch_size, log=log, rect=rect and jax.process_count() == 1)
    what = "converted weights" if meta.get("converted") else f"step {meta['step']}"
    log(format_val_table(res, names=val_data.names))
    log(f"{path} ({what}, {val_data.img_size} px): val {map_line(res)}")
    return res
