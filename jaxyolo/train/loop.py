"""The training loop: one jitted step, ModelEMA, orbax checkpoints, mAP, logs.

Layout of ``out_dir``::

    checkpoints/<step>/   orbax: "state" (params, BatchNorm stats, optimiser
                          state, step), "ema" (EMA params + stats), "meta"
                          (config, epoch, step in epoch, data seed, history)
    steps.csv             one row per step: losses, lr
    metrics.csv           one row per epoch: mean losses, lr, mAP, time
    results.png           loss curves and mAP per epoch

The model state is split once (``nnx.split``) into a train-mode and an
eval-mode graphdef (BatchNorm uses batch statistics and updates its running
averages only in train mode) and pure pytrees of parameters and BatchNorm
statistics, which the jitted step threads explicitly.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxyolo
from jaxyolo.data import collate, eval_batches, iterate, load_data, train_batches
from jaxyolo.evaluate import batched_nms, coco_map
from jaxyolo.models import build_detector
from jaxyolo.train.config import TrainConfig
from jaxyolo.train.optim import ema_decay, ema_tau_for, ema_update, make_optimizer

__all__ = ["make_objective", "Session", "train", "evaluate_checkpoint", "evaluate_model", "main_loss_names"]


def make_objective(config: TrainConfig, *, strides, nc: int, reg_max: int = 16, anchors=None):
    """``f(preds, targets) -> (objective, logs)`` for ``config.loss``.

    ``objective`` is what the optimiser minimises: ``total * nbs / B`` for
    YOLOv5/v8 (upstream's gradient scale; see :class:`TrainConfig`), YOLOX's
    ``total`` as is.  ``logs`` holds ``"loss"`` (the per-image loss: ``total /
    B`` for v5/v8, ``total`` for YOLOX) and the loss's components.
    """
    strides = tuple(strides)
    if config.loss == "yolov8":
        cfg = jaxyolo.TalLossConfig(reg_max=reg_max)

        def f(preds, targets):
            total, comps = jaxyolo.yolov8_loss(preds, targets, strides=strides, config=cfg)
            b = preds[0].shape[0]
            return total * config.nbs / b, {"loss": total / b, **comps}

    elif config.loss == "yolov5":
        cfg = jaxyolo.scale_yolov5_hyp(jaxyolo.Yolov5LossConfig(), nc=nc, num_levels=len(strides), img_size=config.img_size)
        anchors = np.asarray(anchors, np.float32)

        def f(preds, targets):
            total, comps, _ = jaxyolo.yolov5_loss(preds, targets, anchors=anchors, strides=strides, config=cfg)
            b = preds[0].shape[0]
            return total * config.nbs / b, {"loss": total / b, **comps}

    else:
        cfg = jaxyolo.YoloxLossConfig()

        def f(preds, targets):
            total, comps = jaxyolo.yolox_loss(preds, targets, strides=strides, config=cfg)
            return total, {"loss": total, **comps}

    return f


def main_loss_names(loss: str):
    return {"yolov8": ("box", "cls", "dfl"), "yolov5": ("box", "obj", "cls"), "yolox": ("iou", "obj", "cls")}[loss]


_COMPILED: dict = {}


def _to_float_images(images):
    return images.astype(jnp.float32) / 255.0


class Session:
    """A model + optimiser + EMA for one :class:`TrainConfig`, with jitted
    ``train_step`` and ``predict``.  ``state`` is a dict of pytrees:
    ``params``, ``stats`` (BatchNorm), ``opt_state``, ``step``; ``ema`` holds
    ``params`` and ``stats`` of the EMA model.
    """

    def __init__(self, config: TrainConfig, *, nc: int, steps_per_epoch: int):
        self.config = config
        self.nc = nc
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * config.epochs
        model = build_detector(config.loss, nc=nc, size=config.model_size, seed=config.seed)
        self.strides = model.strides
        self.reg_max = getattr(model.head, "reg_max", 16)
        self.anchors = model.head.anchor_array if config.loss == "yolov5" else None
        key = (dataclasses.replace(config, max_steps=None, eval_every=1, data="", train_size=1, val_size=1), nc, steps_per_epoch)
        compiled = _COMPILED.get(key)
        if compiled is None:
            model.eval()
            graph_eval = nnx.graphdef(model)
            model.train()
            graph_train = nnx.graphdef(model)
            compiled = _COMPILED[key] = (graph_train, graph_eval, None, None)
        self.graph_train, self.graph_eval = compiled[0], compiled[1]
        model.train()
        _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.decode = model.decode  # uses only static attributes
        self.tx, self.schedule = make_optimizer(config, self.total_steps, steps_per_epoch)
        self.ema_tau = ema_tau_for(config, self.total_steps)
        self.state = {"params": params, "stats": stats, "opt_state": jax.jit(self.tx.init)(params), "step": jnp.zeros((), jnp.int32)}
        self.ema = jax.jit(lambda t: jax.tree.map(jnp.copy, t))({"params": params, "stats": stats})  # own buffers (donated)
        self.objective = make_objective(config, strides=self.strides, nc=nc, reg_max=self.reg_max, anchors=self.anchors)
        if compiled[2] is None:
            # jit once per (config, nc, steps per epoch) in a process: a second
            # Session of the same run (resume, eval) reuses the executables.
            compiled = _COMPILED[key] = (compiled[0], compiled[1], jax.jit(self._train_step, donate_argnums=(0, 1)), jax.jit(self._predict))
        self.train_step, self.predict = compiled[2], compiled[3]

    def _train_step(self, state, ema, images, targets):
        def loss_fn(params, stats):
            # Fresh Variables at this trace level (BatchNorm mutates its stats).
            stats = jax.tree.map(lambda x: x, stats)
            model = nnx.merge(self.graph_train, params, stats)
            preds = model(_to_float_images(images))
            obj, logs = self.objective(preds, targets)
            _, _, new_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
            return obj, (logs, new_stats)

        (_, (logs, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["stats"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        d = ema_decay(step, decay=self.config.ema_decay, tau=self.ema_tau)
        new_ema = ema_update(ema, {"params": params, "stats": stats}, d)
        logs = dict(logs, lr=self.schedule(state["step"]), grad_norm=optax.global_norm(grads))
        return {"params": params, "stats": stats, "opt_state": opt_state, "step": step}, new_ema, logs

    def _predict(self, params, stats, images):
        model = nnx.merge(self.graph_eval, params, stats)
        boxes, scores = self.decode(model(_to_float_images(images)))
        c = self.config
        return batched_nms(boxes, scores, conf_thres=c.conf_thres, iou_thres=c.iou_thres, max_det=c.max_det)

    def evaluate(self, data, *, use_ema: bool = True, batch_size: int | None = None):
        """COCO mAP of the (EMA) model on ``data``: ``{"map50", "map50_95"}``."""
        src = self.ema if use_ema else self.state
        return evaluate_model(self.predict, src["params"], src["stats"], data, batch_size=batch_size or self.config.batch, max_boxes=self.config.max_boxes)


def evaluate_model(predict, params, stats, data, *, batch_size: int, max_boxes: int):
    """Run ``predict(params, stats, images) -> NMS outputs`` over ``data`` in
    static-shape batches and score it with pycocotools."""
    dets = []
    for batch, n in eval_batches(data, batch_size=batch_size, max_boxes=max_boxes):
        b, s, c, v = jax.device_get(predict(params, stats, jnp.asarray(batch["image"])))
        for i in range(n):
            dets.append((b[i][v[i]], s[i][v[i]], c[i][v[i]]))
    return coco_map(list(data.labels), dets, img_size=data.img_size, nc=data.nc)


# ------------------------------------------------------------ checkpoints


def _manager(out_dir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (out_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def save_checkpoint(mngr, session: Session, meta: dict):
    """Write one checkpoint.  orbax writes into a temporary directory and
    renames it when complete, so an interrupted save never leaves a
    half-written checkpoint that ``--resume`` would pick up."""
    import orbax.checkpoint as ocp

    step = int(session.state["step"])
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(session.state), ema=ocp.args.StandardSave(session.ema), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    mngr.wait_until_finished()


def _restore(mngr, step, items: dict):
    import orbax.checkpoint as ocp

    args = {}
    for k, template in items.items():
        args[k] = ocp.args.JsonRestore() if template is None else ocp.args.StandardRestore(template)
    return mngr.restore(step, args=ocp.args.Composite(**args))


def _find_run_dir(path) -> Path:
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p
    if p.name == "checkpoints" and p.is_dir():
        return p.parent
    if p.parent.name == "checkpoints" and p.is_dir():
        return p.parent.parent
    raise FileNotFoundError(f"no checkpoints under {p} (expected {p / 'checkpoints'})")


# ------------------------------------------------------------------- logs


class _Csv:
    def __init__(self, path: Path, fields, *, keep=None):
        self.path, self.fields = path, list(fields)
        rows = []
        if keep is not None and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if keep(r)]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict):
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)


def _tensorboard(out_dir: Path):
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"))


def plot_results(out_dir: Path, loss_names):
    """``results.png``: per-step loss curves (moving average) and mAP per epoch."""
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
    a1.set_ylabel("loss (moving average)")
    a1.set_yscale("log")
    a1.legend()
    ev = [r for r in epochs if r.get("map50")]
    a2.plot([int(r["epoch"]) for r in ev], [float(r["map50"]) for r in ev], "o-", label="mAP@0.5")
    a2.plot([int(r["epoch"]) for r in ev], [float(r["map50_95"]) for r in ev], "s-", label="mAP@0.5:0.95")
    a2.set_xlabel("epoch")
    a2.set_ylim(0, 1)
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ train


def train(config: TrainConfig, out_dir, *, resume: bool = False, progress: bool = True, log=print, data=None):
    """Train, evaluate each ``eval_every`` epochs, checkpoint each epoch.

    Args:
      config: the run's :class:`TrainConfig` (with ``resume`` the saved one is used).
      out_dir: run directory (created).
      resume: continue from the latest checkpoint in ``out_dir``; the next
        step sees the same batch, parameters, optimiser and EMA state as an
        uninterrupted run, so its loss is identical.
      progress: show tqdm bars.
      log: where summary lines go.
      data: optional ``(train, val)`` :class:`DetectionData` (else loaded from ``config``).

    Returns:
      dict with ``map50``, ``map50_95`` (final, EMA model, val split),
      ``steps`` (global steps done), ``losses`` (per-step ``loss`` values of
      this call), ``seconds``, ``out_dir``.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mngr = _manager(out_dir)
    meta = None
    if resume:
        latest = mngr.latest_step()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}")
        meta = _restore(mngr, latest, {"meta": None})["meta"]
        saved = TrainConfig.from_json(meta["config"])
        # Only how far to run may change on resume.
        config = dataclasses.replace(saved, max_steps=config.max_steps)
    (out_dir / "config.json").write_text(config.dumps())

    if data is None:
        train_data = load_data(config.data, "train", img_size=config.img_size, nc=config.nc, embedded_size=config.train_size)
        val_data = load_data(config.data, "val", img_size=config.img_size, nc=config.nc, embedded_size=config.val_size)
    else:
        train_data, val_data = data
    nc = train_data.nc
    spe = len(train_data) // config.batch
    if spe < 1:
        raise ValueError(f"the training set has {len(train_data)} images, fewer than batch={config.batch}")
    session = Session(config, nc=nc, steps_per_epoch=spe)
    names = main_loss_names(config.loss)
    history = []
    epoch, start = 0, 0
    if meta is not None:
        restored = _restore(mngr, latest, {"state": session.state, "ema": session.ema})
        session.state, session.ema = restored["state"], restored["ema"]
        epoch, start, history = meta["epoch"], meta["step_in_epoch"], meta["history"]
        log(f"resumed {out_dir} at step {latest} (epoch {epoch + 1}, batch {start})")
    done = int(session.state["step"])

    step_fields = ["step", "epoch", "loss", *names, "lr", "grad_norm"]
    steps_csv = _Csv(out_dir / "steps.csv", step_fields, keep=(lambda r: int(r["step"]) <= done) if resume else None)
    epoch_fields = ["epoch", "step", "loss", *names, "lr", "map50", "map50_95", "epoch_s"]
    metrics_csv = _Csv(out_dir / "metrics.csv", epoch_fields, keep=(lambda r: int(r["epoch"]) <= epoch) if resume else None)
    tb = _tensorboard(out_dir)

    def meta_now(ep, st):
        return {"config": config.to_json(), "epoch": ep, "step_in_epoch": st, "data_seed": config.seed, "history": history, "nc": nc, "names": list(train_data.names)}

    losses = []
    last_eval = None
    while epoch < config.epochs:
        t_epoch = time.perf_counter()
        ds = train_batches(train_data, batch_size=config.batch, max_boxes=config.max_boxes, seed=config.seed, epoch=epoch, flip=config.flip)
        bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, dynamic_ncols=True, leave=True)
        sums, count = {}, 0
        stopped = False
        for i, batch in enumerate(iterate(ds, start), start):
            images, targets = collate(batch)
            session.state, session.ema, logs = session.train_step(session.state, session.ema, jnp.asarray(images), jax.tree.map(jnp.asarray, targets))
            logs = {k: float(v) for k, v in logs.items()}
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"non-finite loss {logs['loss']} at step {done + 1}; logs {logs}")
            done += 1
            losses.append(logs["loss"])
            steps_csv.append({"step": done, "epoch": epoch + 1, **logs})
            if tb is not None:
                for k, v in logs.items():
                    tb.add_scalar(f"train/{k}", v, done)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            bar.set_postfix({k: f"{logs[k]:.3g}" for k in ("loss", *names)}, refresh=False)
            if config.max_steps is not None and done >= config.max_steps:
                stopped = i + 1 < spe
                break
        bar.close()
        if config.max_steps is not None and done >= config.max_steps and stopped:
            save_checkpoint(mngr, session, meta_now(epoch, i + 1))
            log(f"stopped at step {done} (max_steps); checkpoint in {out_dir / 'checkpoints'}")
            return {"map50": None, "map50_95": None, "steps": done, "losses": losses, "seconds": time.perf_counter() - t_start, "out_dir": str(out_dir)}
        epoch += 1
        start = 0
        row = {"epoch": epoch, "step": done, **{k: v / max(count, 1) for k, v in sums.items()}, "epoch_s": round(time.perf_counter() - t_epoch, 2)}
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            last_eval = session.evaluate(val_data)
            row.update(last_eval)
            if tb is not None:
                tb.add_scalar("val/map50", last_eval["map50"], epoch)
                tb.add_scalar("val/map50_95", last_eval["map50_95"], epoch)
            if progress:
                log(f"epoch {epoch}: val mAP@0.5 {last_eval['map50']:.4f}  mAP@0.5:0.95 {last_eval['map50_95']:.4f}")
        history.append({k: row.get(k) for k in epoch_fields})
        metrics_csv.append(row)
        save_checkpoint(mngr, session, meta_now(epoch, 0))
        if config.max_steps is not None and done >= config.max_steps:
            break
    if last_eval is None:
        last_eval = session.evaluate(val_data)
    try:
        plot_results(out_dir, names)
    except Exception as e:  # a plot must never lose a finished run
        log(f"warning: could not write results.png: {e}")
    secs = time.perf_counter() - t_start
    (out_dir / "final.json").write_text(json.dumps({**last_eval, "steps": done, "seconds": secs}, indent=1))
    log(f"val mAP@0.5 = {last_eval['map50']:.4f}   mAP@0.5:0.95 = {last_eval['map50_95']:.4f}   ({done} steps, {secs:.0f} s)")
    return {**last_eval, "steps": done, "losses": losses, "seconds": secs, "out_dir": str(out_dir)}


def evaluate_checkpoint(path, *, log=print, batch_size: int | None = None, data=None):
    """Evaluate the EMA model of the latest checkpoint in run dir ``path`` on
    the val split of its config's data.  Returns ``{"map50", "map50_95"}``."""
    run = _find_run_dir(path)
    mngr = _manager(run)
    latest = mngr.latest_step()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'}")
    meta = _restore(mngr, latest, {"meta": None})["meta"]
    config = TrainConfig.from_json(meta["config"])
    val_data = data if data is not None else load_data(config.data, "val", img_size=config.img_size, nc=config.nc, embedded_size=config.val_size)
    session = Session(config, nc=meta["nc"], steps_per_epoch=max(1, config.train_size // config.batch))
    session.ema = _restore(mngr, latest, {"ema": session.ema})["ema"]
    res = session.evaluate(val_data, batch_size=batch_size)
    log(f"{run} (step {latest}): val mAP@0.5 = {res['map50']:.4f}   mAP@0.5:0.95 = {res['map50_95']:.4f}")
    return res
