"""The train step: model state, the objective, on-device augmentation, logs
accumulated on the device, and the sharded ``jit`` that ties them together.

The model is split once (``nnx.split``) into a train-mode and an eval-mode
graphdef (BatchNorm uses batch statistics and updates its running averages
only in train mode) and pure pytrees of parameters and BatchNorm statistics,
which the jitted step threads explicitly.  ``state`` is a dict of pytrees:
``params``, ``stats`` (BatchNorm), ``opt_state``, ``step``; ``ema`` holds the
EMA model's ``params`` and ``stats``; ``acc`` the logged values accumulated
since they were last fetched (:func:`new_acc`).  All three are replicated
over the mesh and donated to the step; the batch is sharded along B.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxyolo
from jaxyolo.data.augment import augment, pad_to_mosaic
from jaxyolo.evaluate import EVAL_PRE_NMS_TOPK, select_detections
from jaxyolo.models import build_detector, build_model, load_weights, transfer_weights
from jaxyolo.targets import Targets
from jaxyolo import parallel
from jaxyolo._xla import compiler_options
from jaxyolo.train.config import TrainConfig
from jaxyolo.train.optim import (
    UltralyticsOptimizer,
    UltralyticsPlan,
    ema_decay,
    ema_tau_for,
    ema_update,
    make_optimizer,
    torch_clip_grad_norm,
    ultralytics_ema_update,
    ultralytics_param_groups,
)

__all__ = ["make_objective", "main_loss_names", "log_names", "build_train_model", "Session", "new_acc"]


def make_objective(config: TrainConfig, *, strides, nc: int, reg_max: int = 16, anchors=None):
    """``f(preds, targets) -> (objective, logs)`` for ``config.loss``
    (``"e2e"``: ``f(preds, targets, *, epoch)``, the 0-based epoch, a traced
    int, that sets ``E2ELoss``'s one-to-many weight, :func:`jaxyolo.e2e_o2m_weight`).

    ``objective`` is what the optimiser minimises: ``total * nbs / B`` for
    YOLOv5/v8/e2e (upstream's gradient scale; see :class:`TrainConfig`), YOLOX's
    ``total`` as is; under ``recipe="ultralytics"`` upstream's ``loss.sum()``,
    the ``x B`` total, whose gradients the step sums over the accumulated batches.  ``logs`` holds ``"loss"`` (the per-image loss: ``total /
    B`` for v5/v8/e2e, ``total`` for YOLOX) and the loss's components
    (:func:`main_loss_names`).
    """
    strides = tuple(strides)
    summed = config.recipe == "ultralytics"

    def scaled(total, comps, b):
        return total if summed else total * config.nbs / b, {"loss": total / b, **comps}

    if config.loss == "yolov8":
        cfg = jaxyolo.TalLossConfig(reg_max=reg_max)

        def f(preds, targets):
            return scaled(*jaxyolo.yolov8_loss(preds, targets, strides=strides, config=cfg), preds[0].shape[0])

    elif config.loss == "e2e":
        cfg = jaxyolo.E2ELossConfig(reg_max=reg_max)

        def f(preds, targets, *, epoch):
            o2m = jaxyolo.e2e_o2m_weight(epoch, config.epochs)
            total, comps = jaxyolo.e2e_loss(preds["one2many"], preds["one2one"], targets, o2m_weight=o2m, strides=strides, config=cfg)
            return scaled(total, comps, targets.mask.shape[0])

    elif config.loss == "yolov5":
        cfg = jaxyolo.scale_yolov5_hyp(jaxyolo.Yolov5LossConfig(), nc=nc, num_levels=len(strides), img_size=config.img_size)
        anchors = np.asarray(anchors, np.float32)

        def f(preds, targets):
            total, comps, _ = jaxyolo.yolov5_loss(preds, targets, anchors=anchors, strides=strides, config=cfg)
            return scaled(total, comps, preds[0].shape[0])

    else:
        cfg = jaxyolo.YoloxLossConfig()

        def f(preds, targets):
            total, comps = jaxyolo.yolox_loss(preds, targets, strides=strides, config=cfg)
            return total, {"loss": total, **comps}

    return f


def main_loss_names(loss: str, reg_max: int = 16):
    """The loss components logged for ``loss`` (YOLOv8/e2e with ``reg_max =
    1``, YOLO26's DFL-free head: the L1 term ``"l1"`` in place of ``"dfl"``)."""
    tal = ("box", "cls", "dfl" if reg_max > 1 else "l1")
    return {"yolov8": tal, "e2e": tal, "yolov5": ("box", "obj", "cls"), "yolox": ("iou", "obj", "cls")}[loss]


def log_names(loss: str, reg_max: int = 16):
    """Every value the train step logs, in column order (``boxes_cut``: boxes
    of the augmented batch beyond ``max_boxes``, dropped; see TrainConfig)."""
    return ("loss", *main_loss_names(loss, reg_max), "lr", "grad_norm", "boxes_cut")


# ---------------------------------------------------------- logged values


def new_acc(names, window: int):
    """Zeroed accumulator of the logged values (host numpy; place it with the
    replicated sharding).  ``win``/``epoch``: sums since the last fetch / since
    the epoch began; ``n``/``epoch_n``: their step counts; ``losses``: the
    per-step ``loss`` of the current window (``window`` = log interval);
    ``last``: the latest step's values; ``bad_step``: the global step of the first non-finite loss (0: none)."""
    z = {k: np.float32(0) for k in names}
    return {
        "last": dict(z), "win": dict(z), "epoch": dict(z), "n": np.int32(0), "epoch_n": np.int32(0),
        "losses": np.zeros((window,), np.float32), "bad_step": np.int32(0),
    }


def _accumulate(acc, logs, step):
    finite = jnp.isfinite(logs["loss"])
    return {
        "last": logs,
        "win": {k: acc["win"][k] + logs[k] for k in acc["win"]},
        "epoch": {k: acc["epoch"][k] + logs[k] for k in acc["epoch"]},
        "n": acc["n"] + 1,
        "epoch_n": acc["epoch_n"] + 1,
        "losses": acc["losses"].at[acc["n"] % acc["losses"].shape[0]].set(logs["loss"]),
        "bad_step": jnp.where((acc["bad_step"] == 0) & ~finite, step, acc["bad_step"]),
    }


# ---------------------------------------------------------------- session


def build_train_model(config: TrainConfig, *, nc: int, log=None):
    """The model of ``config``: jaxyolo's own ``pico``/``nano``/``small`` with
    the head of ``config.loss``, or an upstream architecture, initialised from
    ``config.weights`` where given (every tensor whose path and shape match;
    see :func:`jaxyolo.models.transfer_weights`)."""
    if config.own_model:
        return build_detector(config.loss, nc=nc, size=config.model, seed=config.seed)
    # The upstream blocks compute in their ``dtype`` (float32 by default,
    # whatever the parameters' dtype): bf16 is set at build time.
    model = build_model(config.model, nc=nc, seed=config.seed, dtype=jnp.bfloat16 if config.precision == "bf16" else None)
    if config.weights is not None:
        src = load_weights(config.weights)
        if src.name != config.model:
            raise ValueError(f"weights: {config.weights} holds a {src.name}, not the model={config.model!r} being trained")
        copied, total, skipped = transfer_weights(model, src)
        if log is not None:
            extra = f"; kept fresh: {', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''}" if skipped else ""
            log(f"weights: {copied}/{total} tensors from {config.weights} ({src.nc} classes -> {nc}){extra}")
    return model



_COMPILED: dict = {}
_PRECISION = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _to_float_images(images, dtype=jnp.float32):
    return (images.astype(jnp.float32) / 255.0).astype(dtype)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Session:
    """A model + optimiser + EMA for one :class:`TrainConfig` on a device mesh,
    with the jitted, sharded ``train_step`` and ``predict``.

    Args:
      config: the run's configuration.
      nc: number of classes.
      steps_per_epoch: for the LR schedule and the EMA ramp.
      mesh: a ``("data",)`` mesh (:func:`jaxyolo.parallel.make_mesh`);
        None: all devices.
      log_every: the window of per-step losses kept in ``acc`` (the log interval).
      log: where a line about loaded ``config.weights`` goes (None: nowhere).
      train_images: the training set's size, for ``recipe="ultralytics"``
        with ``optimizer="auto"`` (default ``steps_per_epoch * batch``).

    ``train_step(state, ema, acc, batch) -> (state, ema, acc)`` with ``batch``
    the pipeline's dict (:class:`jaxyolo.data.TrainBatches`): ``image (B, K,
    S, S, 3) uint8``, ``rects (B, K, 4)``, ``boxes (B, K, M, 4)``, ``classes
    (B, K, M)``, ``mask (B, K, M)`` with K = 4 in mosaic epochs, else 1 (one
    compile each; ``pad_to_mosaic(batch)`` makes a K = 1 batch a K = 4 one
    without mosaic partners, :func:`jaxyolo.data.augment.pad_to_mosaic`, so
    that the mosaic epochs' step runs it: the trainer does so).  The augmentations run first, drawn on the device from
    ``(config.seed, step)``.  ``acc["last"]`` holds the step's logged values.
    ``predict(params, stats, images uint8, max_det) -> batched_nms outputs``
    (multi-label, with the candidate counts, as
    :func:`jaxyolo.evaluate.evaluate_model` takes them; ``max_det`` a static
    positional int, None: the config's).
    """

    def __init__(self, config: TrainConfig, *, nc: int, steps_per_epoch: int, mesh=None, log_every: int = 1, log=None, train_images: int | None = None):
        self.config = config
        self.nc = nc
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * config.epochs
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        parallel.check_batch(config.batch, self.mesh)
        self.log_every = log_every
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)
        model = build_train_model(config, nc=nc, log=log)
        self.strides = model.strides
        self.reg_max = getattr(model.head, "reg_max", 16)
        self.names = log_names(config.loss, self.reg_max)
        self.anchors = model.head.anchor_array if config.loss == "yolov5" else None
        # End-to-end models keep their one-to-one branch's top scores (no NMS)
        # unless config.nms asks for the one-to-many branch and NMS.
        two_branches = bool(getattr(model, "end2end", False))
        self.end2end = two_branches and not config.nms
        self.decode = functools.partial(model.decode, one2many=True) if two_branches and config.nms else model.decode
        self.dtype = _PRECISION[config.precision]
        self.plan = None
        if config.recipe == "ultralytics":
            self.plan = UltralyticsPlan.from_config(config, nc=nc, steps_per_epoch=steps_per_epoch, n_images=train_images)
            self.schedule = lambda step: self.plan.hyperparams(step)["lr"][0]  # the weight group's
        else:
            self.tx, self.schedule = make_optimizer(config, self.total_steps, steps_per_epoch)
        self.ema_tau = ema_tau_for(config, self.total_steps)
        self.objective = make_objective(config, strides=self.strides, nc=nc, reg_max=self.reg_max, anchors=self.anchors)

        key = (
            dataclasses.replace(config, max_steps=None, eval_every=1, data="", images=None, weights=None, train_size=1, val_size=1),
            nc, steps_per_epoch, tuple(d.id for d in self.mesh.devices.flat), log_every, self.plan,
        )
        model.eval()
        graph_eval = nnx.graphdef(model)
        model.train()
        graph_train, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        # Raw arrays, not nnx.Variable leaves: every call of the jitted step
        # would otherwise rebuild ~1000 Variable objects on the host from its
        # outputs (about 10 ms a step, a dispatch cost the device waits on).
        params, stats = nnx.pure(params), nnx.pure(stats)
        if self.plan is not None:
            self.tx = UltralyticsOptimizer(self.plan, ultralytics_param_groups(params, musgd=self.plan.optimizer == "musgd"))
        compiled = _COMPILED.get(key)
        if compiled is None:
            # jit once per (config, nc, steps per epoch, mesh) in a process: a
            # second Session of the same run (resume, eval) reuses the executables.
            self.graph_train, self.graph_eval = graph_train, graph_eval
            rep, bsh = self.replicated, self.batch_sharding
            opts = compiler_options(self.mesh.devices.flat[0].platform)
            train_step = jax.jit(self._train_step, in_shardings=(rep, rep, rep, bsh), out_shardings=(rep, rep, rep), donate_argnums=(0, 1, 2),
                                 compiler_options=opts)
            predict = jax.jit(self._predict, in_shardings=(rep, rep, bsh), out_shardings=bsh, static_argnums=(3,),
                              compiler_options=opts)
            compiled = _COMPILED[key] = (graph_train, graph_eval, train_step, predict)
        self.graph_train, self.graph_eval, self.train_step, self.predict = compiled
        self.pad_to_mosaic = jax.jit(pad_to_mosaic, in_shardings=(self.batch_sharding,), out_shardings=self.batch_sharding)

        def init_state(p, s):
            state = {"params": p, "stats": s, "opt_state": self.tx.init(p), "step": jnp.zeros((), jnp.int32)}
            if self.plan is not None:  # the summed gradients, the iteration of the last optimizer step, the EMA's updates
                state["accum"] = {"grads": jax.tree.map(jnp.zeros_like, p), "last_opt_step": jnp.int32(-1), "updates": jnp.int32(0)}
            return state

        init = jax.jit(init_state, out_shardings=self.replicated)
        self.state = init(params, stats)
        # The EMA starts as a copy with its own buffers (both are donated).
        self.ema = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.replicated)({"params": params, "stats": stats})

    def new_acc(self):
        return jax.device_put(new_acc(self.names, self.log_every), self.replicated)

    def _train_step(self, state, ema, acc, batch):
        config = self.config
        if config.max_boxes is None:  # at trace time
            raise ValueError("config.max_boxes is None: resolve it before training (train() sets jaxyolo.train.loop.default_max_boxes(train_data))")
        key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        aug = config.augment_config(mosaic=batch["image"].shape[1] == 4)
        targets = Targets(batch["boxes"], batch["classes"], batch["mask"])
        images, targets, cut = augment(key, batch["image"], batch["rects"], targets, config=aug, max_boxes=config.max_boxes)

        def loss_fn(params, stats):
            # Mixed precision: the forward pass in self.dtype (parameters cast,
            # BatchNorm statistics reduced in float32 by flax); the masters, the
            # statistics and the losses stay float32.
            model = nnx.merge(self.graph_train, _cast_floats(params, self.dtype), stats)
            preds = model(_to_float_images(images, self.dtype))
            if config.loss == "e2e":
                obj, logs = self.objective(preds, targets, epoch=state["step"] // self.steps_per_epoch)
            else:
                obj, logs = self.objective(preds, targets)
            _, _, new_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
            return obj, (logs, _cast_floats(nnx.pure(new_stats), jnp.float32))

        (_, (logs, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state["stats"])
        if self.plan is not None:
            return self._ultralytics_update(state, ema, acc, grads, stats, logs, cut)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        d = ema_decay(step, decay=config.ema_decay, tau=self.ema_tau)
        new_ema = ema_update(ema, {"params": params, "stats": stats}, d)
        logs = dict(logs, lr=self.schedule(state["step"]), grad_norm=optax.global_norm(grads), boxes_cut=cut.sum())
        logs = {k: jnp.asarray(logs[k], jnp.float32) for k in self.names}
        acc = _accumulate(acc, logs, step)
        return {"params": params, "stats": stats, "opt_state": opt_state, "step": step}, new_ema, acc

    def _ultralytics_update(self, state, ema, acc, grads, stats, logs, cut):
        """``recipe="ultralytics"``: ``_do_train``'s loop body after the
        backward pass.  The batch's gradients add to the sum; when ``ni -
        last_opt_step >= accumulate`` (``ni`` = ``state["step"]``, this
        batch's iteration) ``optimizer_step``: the sum clipped at
        ``grad_clip`` as ``clip_grad_norm_``, the optimizer step with the
        iteration's LRs and momentum, the sum zeroed, and the EMA updated
        (``updates += 1``, ``d = ema_decay (1 - exp(-updates / ema_tau))``).
        BatchNorm statistics move at every batch (the forward)."""
        config, plan = self.config, self.plan
        ni = state["step"]
        hp = plan.hyperparams(ni)
        accum = state["accum"]
        total = jax.tree.map(jnp.add, accum["grads"], grads)

        def opt_step(args):
            params, opt_state, total, ema, updates = args
            clipped, _ = torch_clip_grad_norm(total, config.grad_clip)
            params, opt_state = self.tx.step(clipped, opt_state, params, lr=hp["lr"], momentum=hp["momentum"])
            updates = updates + 1
            d = ema_decay(updates, decay=config.ema_decay, tau=self.ema_tau)
            ema = ultralytics_ema_update(ema, {"params": params, "stats": stats}, d)
            return params, opt_state, jax.tree.map(jnp.zeros_like, total), ema, updates, ni

        def no_step(args):
            return (*args, accum["last_opt_step"])

        params, opt_state, total, ema, updates, last = jax.lax.cond(
            ni - accum["last_opt_step"] >= hp["accumulate"], opt_step, no_step,
            (state["params"], state["opt_state"], total, ema, accum["updates"]),
        )
        step = ni + 1
        logs = dict(logs, lr=hp["lr"][0], grad_norm=optax.global_norm(grads), boxes_cut=cut.sum())
        logs = {k: jnp.asarray(logs[k], jnp.float32) for k in self.names}
        acc = _accumulate(acc, logs, step)
        new_state = {
            "params": params, "stats": stats, "opt_state": opt_state, "step": step,
            "accum": {"grads": total, "last_opt_step": last, "updates": updates},
        }
        return new_state, ema, acc

    def decode_images(self, params, stats, images):
        """Eval-mode forward + decode: ``images (B, H, W, 3) uint8`` ->
        ``(boxes (B, A, 4) xyxy px, scores (B, A, nc))`` float32 (not jitted)."""
        model = nnx.merge(self.graph_eval, _cast_floats(params, self.dtype), stats)
        return self.decode(jax.tree.map(lambda p: p.astype(jnp.float32), model(_to_float_images(images, self.dtype))))

    def _predict(self, params, stats, images, max_det):
        # The evaluation NMS of ``yolo val``: multi-label, conf/IoU/max_det of the config.
        c = self.config
        return self.detect(params, stats, images, conf_thres=c.conf_thres, iou_thres=c.iou_thres, max_det=max_det or c.max_det,
                           multi_label=True, pre_nms_topk=EVAL_PRE_NMS_TOPK, with_count=True)

    def detect(self, params, stats, images, *, conf_thres, iou_thres, max_det, multi_label=False, pre_nms_topk=1000,
               with_count=False):
        """:meth:`decode_images` then the detections: NMS, or for an
        end-to-end model the one-to-one top-k (:func:`jaxyolo.evaluate.select_detections`)."""
        return select_detections(*self.decode_images(params, stats, images), end2end=self.end2end, conf_thres=conf_thres,
                                 iou_thres=iou_thres, max_det=max_det, multi_label=multi_label, pre_nms_topk=pre_nms_topk,
                                 with_count=with_count)
