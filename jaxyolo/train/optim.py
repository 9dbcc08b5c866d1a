"""Optimiser, LR schedule and ModelEMA: jaxyolo's own recipe in optax
(:func:`make_optimizer`), ultralytics' ``BaseTrainer`` recipe step for
step (:class:`UltralyticsPlan`, :class:`UltralyticsOptimizer`), both with
ultralytics' ``MuSGD`` (:mod:`jaxyolo.train.muon`) as ``optimizer="musgd"``."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxyolo.train.config import TrainConfig
from jaxyolo.train.muon import HEAD_LR_SCALE, MuSGDState, musgd, musgd_init, musgd_step, newton_schulz5, ultralytics_musgd_masks

__all__ = [
    "MuSGDState", "musgd", "newton_schulz5", "ultralytics_musgd_masks", "MUSGD_WEIGHTS",
    "lr_schedule", "make_optimizer", "decay_mask", "ema_decay", "ema_tau_for", "ema_update",
    "GROUP_NAMES", "UltralyticsOptimizer", "UltralyticsPlan", "torch_clip_grad_norm", "torch_lerp", "ultralytics_accumulate",
    "ultralytics_auto_optimizer", "ultralytics_ema_update", "ultralytics_param_groups", "ultralytics_warmup_iterations",
    "ultralytics_weight_decay",
]


def lr_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int):
    """Linear warmup 0 -> peak over ``max(warmup_epochs * steps_per_epoch,
    warmup_min_steps)`` steps (capped at half the run), then cosine or linear
    decay to ``peak * lrf`` at ``total_steps``.  ``peak = lr0`` (times
    ``batch / 64`` for YOLOX with SGD, its per-image LR rule; AdamW is
    invariant to the loss scale, so it takes ``lr0`` as is, and so does
    MuSGD, whose Muon half is)."""
    peak = config.lr0 * (config.batch / 64 if config.loss == "yolox" and config.optimizer == "sgd" else 1.0)
    warm = int(min(max(config.warmup_epochs * steps_per_epoch, config.warmup_min_steps), total_steps // 2))
    decay = max(total_steps - warm, 1)
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=config.lrf)
    else:
        after = optax.linear_schedule(peak, peak * config.lrf, decay)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def decay_mask(params):
    """True for conv kernels (4-D weights), False for BatchNorm scale/bias and conv biases."""
    return jax.tree.map(lambda x: x.ndim == 4, params)


MUSGD_WEIGHTS = {"muon": 0.2, "sgd": 1.0}  # build_optimizer's MuSGD(muon=0.2, sgd=1.0) (MuSGD's own defaults: 0.5, 0.5)


def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int):
    """``optax`` chain: optional global-norm clipping, then

    * ``"sgd"``: weight decay added to the gradient (torch SGD semantics) on
      conv kernels only, Nesterov momentum ``config.momentum``;
    * ``"adamw"``: decoupled weight decay on conv kernels only,
      ``b1 = config.momentum``, ``b2 = 0.999``;
    * ``"musgd"``: ultralytics' MuSGD (:func:`musgd`, Nesterov, Muon's beta =
      ``config.momentum``, :data:`MUSGD_WEIGHTS`) with upstream's groups
      (:func:`ultralytics_musgd_masks`: Muon on the kernels, decay on the
      kernels, the head's class branches at lr x3);

    with :func:`lr_schedule`.
    """
    sched = lr_schedule(config, total_steps, steps_per_epoch)
    parts = []
    if config.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.optimizer == "sgd":
        parts += [
            optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
            optax.sgd(sched, momentum=config.momentum, nesterov=True),
        ]
    elif config.optimizer == "musgd":
        masks = {name: functools.partial(_musgd_mask, i) for i, name in enumerate(("muon_mask", "decay_mask", "lr_scale"))}
        parts.append(musgd(sched, momentum=config.momentum, weight_decay=config.weight_decay, **MUSGD_WEIGHTS, **masks))
    elif config.optimizer == "adamw":
        parts.append(optax.adamw(sched, b1=config.momentum, b2=0.999, weight_decay=config.weight_decay, mask=decay_mask))
    else:
        raise ValueError(f"make_optimizer: optimizer {config.optimizer!r} is not one of the jaxyolo recipe's (sgd, adamw, musgd)")
    return optax.chain(*parts), sched


def _musgd_mask(i, params):
    return ultralytics_musgd_masks(params)[i]


def ema_tau_for(config: TrainConfig, total_steps: int) -> float:
    """ModelEMA ramp constant.  Upstream's ``tau = 2000`` suits runs of 100k+
    steps; for a run of ``T`` steps the default here is ``T / 5``, so the
    decay ends near ``1 - 1/150`` (an averaging window of ~T/10 steps) instead
    of either staying near 0 (tau too large: no averaging) or saturating at
    0.9999 early (tau too small: the EMA freezes while the LR still decays)."""
    return float(config.ema_tau) if config.ema_tau is not None else max(total_steps / 5.0, 1.0)


def ema_decay(updates, *, decay: float, tau: float):
    """YOLO ModelEMA decay ``decay * (1 - exp(-updates / tau))`` (``updates`` counts from 1)."""
    return decay * (1.0 - jnp.exp(-jnp.asarray(updates, jnp.float32) / tau))


def ema_update(ema, new, d):
    """``ema * d + new * (1 - d)`` leaf-wise, float leaves only."""
    return jax.tree.map(lambda e, x: e * d + x.astype(e.dtype) * (1.0 - d) if jnp.issubdtype(e.dtype, jnp.floating) else x, ema, new)


# --------------------------------------------------------------------------
# recipe="ultralytics": BaseTrainer's optimiser, warmup, scheduler and EMA
# (ultralytics 8.4.x engine/trainer.py: _build_train_pipeline,
# build_optimizer, _setup_scheduler, _get_warmup_iterations, _do_train,
# optimizer_step; utils/torch_utils.py: ModelEMA, one_cycle), in JAX.

GROUP_NAMES = ("weight", "bn", "bias")  # build_optimizer's g[0], g[1], g[2]


def ultralytics_accumulate(*, nbs: int = 64, batch: int) -> int:
    """Batches summed per optimizer step: ``max(round(nbs / batch), 1)``
    (Python's round: halves to even, as upstream)."""
    _positive_int(nbs=nbs, batch=batch)
    return max(round(nbs / batch), 1)


def ultralytics_weight_decay(*, weight_decay: float = 5e-4, nbs: int = 64, batch: int) -> float:
    """The decay of the weight group: ``weight_decay * batch * accumulate / nbs``
    (the uncapped :func:`ultralytics_accumulate`)."""
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    return weight_decay * batch * ultralytics_accumulate(nbs=nbs, batch=batch) / nbs


def ultralytics_warmup_iterations(*, warmup_epochs: float = 3.0, epochs: int, nb: int) -> int:
    """``nw``, the warmup's length in iterations (batches):
    ``round(min(warmup_epochs, epochs - 1) * nb)``, 0 without warmup
    (``_get_warmup_iterations``: the last epoch is never warmup; no minimum)."""
    _positive_int(epochs=epochs, nb=nb)
    if not warmup_epochs >= 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    we = min(warmup_epochs, max(epochs - 1, 0))
    return round(we * nb) if we > 0 else 0


def ultralytics_auto_optimizer(*, nc: int, n_images: int, batch: int, nbs: int = 64, epochs: int):
    """``optimizer=auto``: ``(name, lr0, momentum)``.

    Upstream counts ``iterations = ceil(n_images / max(batch, nbs)) * epochs``
    (optimizer steps, roughly); up to 10 000: ``("adamw", round(0.002 * 5 /
    (4 + nc), 6), 0.9)``, beyond: ``("musgd", 0.01, 0.9)`` (MuSGD: Muon on
    matrices and conv filters + SGD).  Upstream's auto also sets
    ``warmup_bias_lr = 0`` but leaves ``args.momentum``, where the warmup's
    momentum ends (see :class:`UltralyticsPlan`).
    """
    _positive_int(nc=nc, n_images=n_images, batch=batch, nbs=nbs, epochs=epochs)
    iterations = math.ceil(n_images / max(batch, nbs)) * epochs
    if iterations > 10000:
        return "musgd", 0.01, 0.9
    return "adamw", round(0.002 * 5 / (4 + nc), 6), 0.9


def ultralytics_param_groups(params, *, musgd: bool = False):
    """build_optimizer's group of each leaf: 0 conv/linear weights (``kernel``,
    with decay), 1 BatchNorm weights (``scale``), 2 biases (conv and
    BatchNorm ``bias``).  ``params``: a pytree whose leaves' last path keys
    are flax's names; returns the same tree of ints.

    ``musgd=True``: build_optimizer's MuSGD groups, each of the above split
    in two: ``k + 3`` for the half at ``lr * 3`` (the detect head's class
    branches, :func:`ultralytics_musgd_masks`).  Its ``muon`` group (the
    2-D/4-D weights, with decay) has the weight group's LR and decay: here
    it is group 0 (3), told apart by ``ndim``.
    """
    if musgd:
        boosted = ultralytics_musgd_masks(params)[2]
        return jax.tree.map(lambda k, s: k + 3 * (s != 1.0), ultralytics_param_groups(params), boosted)

    def group(path, _):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if name == "bias":
            return 2
        if name == "scale":
            return 1
        if name == "kernel":
            return 0
        raise ValueError(f"params: no ultralytics parameter group for {jax.tree_util.keystr(path)} (kernel, scale or bias)")

    return jax.tree_util.tree_map_with_path(group, params)


@dataclasses.dataclass(frozen=True)
class UltralyticsPlan:
    """The host-side constants of a run under ``recipe="ultralytics"``, and
    the per-iteration hyperparameters computed from them inside the jit.

    Attributes:
      optimizer: ``"adamw"``, ``"sgd"`` or ``"musgd"`` (``"auto"`` resolved).
      lr0: every group's ``initial_lr`` (MuSGD's halves at lr x3: ``lr0 * 3``).
      momentum: the optimizer's momentum (SGD, MuSGD) / beta1 (AdamW) as built.
      target_momentum: where the warmup momentum of SGD and MuSGD ends
        (upstream's ``args.momentum``, which ``optimizer=auto`` leaves: its
        MuSGD steps at 0.9 only without warmup).
      warmup_momentum, warmup_bias_lr: the warmup's starts (0 for the bias LR under auto).
      weight_decay: the weight group's decay (already scaled).
      accumulate: ``acc0``, the nominal accumulation, capped at ``nb * epochs``.
      nb: batches per epoch; nw: warmup iterations; epochs, lrf, cos_lr: the LambdaLR.
      warmup_accumulate: ``accumulate`` at iterations ``0..nw``, upstream's
        float64 ``np.interp(ni, [0, nw], [1, acc0]).round()`` (tabulated:
        float32 could round a half the other way).
    """

    optimizer: str
    lr0: float
    momentum: float
    target_momentum: float
    warmup_momentum: float
    warmup_bias_lr: float
    weight_decay: float
    accumulate: int
    nb: int
    nw: int
    epochs: int
    lrf: float
    cos_lr: bool
    warmup_accumulate: tuple

    @classmethod
    def from_config(cls, config: TrainConfig, *, nc: int, steps_per_epoch: int, n_images: int | None = None):
        """Upstream's ``_build_train_pipeline`` + ``build_optimizer`` +
        ``_do_train`` set-up for ``config``: ``steps_per_epoch`` is upstream's
        ``nb``; ``n_images`` the training set's size (default
        ``steps_per_epoch * batch``), which only ``optimizer="auto"`` uses."""
        if config.recipe != "ultralytics":
            raise ValueError(f"config.recipe must be 'ultralytics', got {config.recipe!r}")
        _positive_int(nc=nc, steps_per_epoch=steps_per_epoch)
        n_images = steps_per_epoch * config.batch if n_images is None else n_images
        acc0 = ultralytics_accumulate(nbs=config.nbs, batch=config.batch)
        wd = ultralytics_weight_decay(weight_decay=config.weight_decay, nbs=config.nbs, batch=config.batch)
        acc0 = min(acc0, steps_per_epoch * config.epochs)
        name, lr0, momentum, bias_lr = config.optimizer, config.lr0, config.momentum, config.warmup_bias_lr
        if name == "auto":
            name, lr0, momentum = ultralytics_auto_optimizer(nc=nc, n_images=n_images, batch=config.batch, nbs=config.nbs, epochs=config.epochs)
            bias_lr = 0.0
        nw = ultralytics_warmup_iterations(warmup_epochs=config.warmup_epochs, epochs=config.epochs, nb=steps_per_epoch)
        table = tuple(max(1, int(np.interp(ni, [0, nw], [1, acc0]).round())) for ni in range(nw + 1)) if nw else ()
        return cls(
            optimizer=name, lr0=lr0, momentum=momentum, target_momentum=config.momentum, warmup_momentum=config.warmup_momentum,
            warmup_bias_lr=bias_lr, weight_decay=wd, accumulate=acc0, nb=steps_per_epoch, nw=nw, epochs=config.epochs,
            lrf=config.lrf, cos_lr=config.schedule == "cosine", warmup_accumulate=table,
        )

    def lf(self, epoch):
        """The LambdaLR factor of ``epoch`` (int, traced or not; float32):
        linear ``max(1 - e / epochs, 0) * (1 - lrf) + lrf``, or
        ``one_cycle(1, lrf, epochs)`` = ``max((1 - cos(e pi / epochs)) / 2, 0) * (lrf - 1) + 1``."""
        e = jnp.asarray(epoch, jnp.float32)
        if self.cos_lr:
            return jnp.maximum((1 - jnp.cos(e * math.pi / self.epochs)) / 2, 0.0) * (self.lrf - 1.0) + 1.0
        return jnp.maximum(1 - e / self.epochs, 0.0) * (1.0 - self.lrf) + self.lrf

    @property
    def groups(self) -> int:
        """The number of LR groups: 3 (weight, bn, bias), 6 for MuSGD (the
        same, then their halves at ``lr0 * 3``; :func:`ultralytics_param_groups`)."""
        return 6 if self.optimizer == "musgd" else 3

    def hyperparams(self, ni):
        """The hyperparameters in force at iteration ``ni`` (the 0-based batch
        counter over the run, int32, traced): ``{"lr": (groups,) float32`` per
        group (weight, bn, bias; for MuSGD then the same at lr x3),
        ``"momentum": ()`` float32 (SGD / MuSGD momentum, AdamW beta1),
        ``"accumulate": ()`` int32``}``.

        As ``_do_train``: the LambdaLR steps at each epoch's start
        (``initial_lr * lf(epoch)``); for ``ni <= nw`` the warmup overwrites
        it with ``interp(ni, [0, nw], [start, initial_lr * lf(epoch)])``
        (start ``warmup_bias_lr`` for a bias group, 0 for the others: a
        MuSGD bias half at lr x3 rises from ``warmup_bias_lr`` to ``3 lr0
        lf``, not 3x the other's), the momentum of SGD and MuSGD with
        ``interp(ni, [0, nw], [warmup_momentum, target_momentum])`` (AdamW's
        param groups have no ``momentum``: beta1 stays) and the accumulation
        count; after ``nw`` they keep their values at ``nw``.
        """
        ni = jnp.asarray(ni, jnp.int32)
        initial = [self.lr0] * 3 + [self.lr0 * HEAD_LR_SCALE] * (self.groups - 3)  # Python doubles, as build_optimizer's
        lr = jnp.asarray(initial, jnp.float32) * self.lf(ni // self.nb)
        mom = jnp.float32(self.momentum)
        acc = jnp.int32(self.accumulate)
        if self.nw:
            warm = ni < self.nw  # ni == nw lands on the targets (np.interp returns fp[-1] exactly there)
            x = ni.astype(jnp.float32)
            start = jnp.asarray([0.0, 0.0, self.warmup_bias_lr] * (self.groups // 3), jnp.float32)
            lr = jnp.where(warm, (lr - start) / self.nw * x + start, lr)  # np.interp: slope * (x - x0) + y0
            if self.optimizer in ("sgd", "musgd"):
                m0, m1 = jnp.float32(self.warmup_momentum), jnp.float32(self.target_momentum)
                mom = jnp.where(warm, (m1 - m0) / self.nw * x + m0, m1)  # after nw: the value set at nw
            table = jnp.asarray(self.warmup_accumulate, jnp.int32)
            acc = jnp.where(ni <= self.nw, table[jnp.clip(ni, 0, self.nw)], acc)
        return {"lr": lr, "momentum": mom, "accumulate": acc}


def torch_clip_grad_norm(grads, max_norm: float = 10.0):
    """``torch.nn.utils.clip_grad_norm_``: the global 2-norm ``n`` of every
    leaf, then every leaf times ``min(max_norm / (n + 1e-6), 1)`` (also when
    that is 1).  Returns ``(clipped grads, n)``."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    coef = jnp.minimum(jnp.float32(max_norm) / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), grads), norm


def torch_lerp(start, end, weight):
    """``torch.lerp`` (ATen's CPU formula): ``start + w (end - start)`` for
    ``|w| < 0.5``, else ``end - (end - start)(1 - w)``; ``weight`` a scalar."""
    w = jnp.asarray(weight, start.dtype)
    return jnp.where(jnp.abs(w) < 0.5, start + w * (end - start), end - (end - start) * (1 - w))


class UltralyticsOptimizer:
    """torch's AdamW / SGD and ultralytics' MuSGD as BaseTrainer builds them,
    on its parameter groups (:func:`ultralytics_param_groups`: three, six
    for MuSGD) with per-group learning rates and a momentum that change
    every step (:meth:`UltralyticsPlan.hyperparams`).

    * ``"adamw"``: per leaf, ``step += 1``; ``p *= 1 - lr * wd`` (decay in the
      weight group only); ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 v + (1 -
      beta2) g^2``; ``p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 -
      beta2^step) + eps)`` with beta2 0.999, eps 1e-8 (torch's single-tensor
      CPU path).
    * ``"sgd"`` (Nesterov, dampening 0): ``g += wd * p``; ``buf = g`` at the
      first step, else ``buf = momentum * buf + g``; ``p -= lr * (g + momentum * buf)``
      (a zero buffer gives torch's first step exactly).
    * ``"musgd"`` (:func:`musgd_step`, Nesterov, :data:`MUSGD_WEIGHTS`): each
      leaf at its group's ``lr`` (``lr[k]``, the lr x3 halves included: the
      group LR is what ``MuSGD.step`` reads, then scales by ``muon`` / ``sgd``),
      the momentum for SGD and Muon's beta alike, the weight decay in groups
      0 and 3 (upstream's ``muon`` and ``weight``); Muon on the 2-D/4-D
      leaves, Newton-Schulz in ``ns_dtype`` (upstream: bfloat16).

    ``init(params) -> state``; ``step(grads, state, params, *, lr (groups,),
    momentum) -> (params, state)``: the new parameters directly, in torch's
    order of operations (not an update to add).
    """

    def __init__(self, plan: UltralyticsPlan, groups, *, beta2: float = 0.999, eps: float = 1e-8, ns_dtype=jnp.bfloat16):
        if plan.optimizer not in ("adamw", "sgd", "musgd"):
            raise ValueError(f"plan.optimizer must be 'adamw', 'sgd' or 'musgd', got {plan.optimizer!r}")
        bad = sorted({int(k) for k in jax.tree.leaves(groups)} - set(range(plan.groups)))
        if bad:  # an index past lr's end would be clamped inside the jit, silently
            hint = " (ultralytics_param_groups(params, musgd=True) gives MuSGD's six)" if plan.optimizer == "musgd" else ""
            raise ValueError(f"groups: plan.optimizer {plan.optimizer!r} has {plan.groups} LR groups 0..{plan.groups - 1}, got group {bad[0]}{hint}")
        self.plan, self.groups, self.beta2, self.eps, self.ns_dtype = plan, groups, beta2, eps, ns_dtype

    def init(self, params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        if self.plan.optimizer == "musgd":
            return musgd_init(params, ultralytics_musgd_masks(params)[0])
        if self.plan.optimizer == "sgd":
            return {"buf": zeros}
        return {"count": jnp.zeros((), jnp.int32), "mu": zeros, "nu": jax.tree.map(jnp.zeros_like, params)}

    def step(self, grads, state, params, *, lr, momentum):
        if self.plan.optimizer == "musgd":
            lr_leaf = jax.tree.map(lambda k: lr[k], self.groups)
            wd_leaf = jax.tree.map(lambda k: self.plan.weight_decay if k % 3 == 0 else 0.0, self.groups)
            return musgd_step(grads, state, params, lr=lr_leaf, momentum=momentum, weight_decay=wd_leaf, muon_mask=ultralytics_musgd_masks(params)[0],
                              batch_key=self.groups, **MUSGD_WEIGHTS, ns_dtype=self.ns_dtype)
        wd = jnp.asarray([self.plan.weight_decay, 0.0, 0.0], jnp.float32)
        if self.plan.optimizer == "sgd":
            def leaf(p, g, buf, k):
                if k == 0:
                    g = g + wd[0] * p
                buf = buf * momentum + g
                return p + (-lr[k]) * (g + momentum * buf), buf

            out = jax.tree.map(leaf, params, grads, state["buf"], self.groups)
            new_p = jax.tree.map(lambda o: o[0], out, is_leaf=lambda o: isinstance(o, tuple))
            return new_p, {"buf": jax.tree.map(lambda o: o[1], out, is_leaf=lambda o: isinstance(o, tuple))}
        count = state["count"] + 1
        b1, b2 = momentum, jnp.float32(self.beta2)
        t = count.astype(jnp.float32)
        bc1 = 1 - b1**t
        bc2_sqrt = jnp.sqrt(1 - b2**t)

        def leaf(p, g, m, v, k):
            if k == 0:
                p = p * (1 - lr[0] * wd[0])
            m = torch_lerp(m, g, 1 - b1)
            v = v * b2 + (1 - b2) * (g * g)
            denom = jnp.sqrt(v) / bc2_sqrt + self.eps
            return p + (-(lr[k] / bc1)) * (m / denom), m, v

        out = jax.tree.map(leaf, params, grads, state["mu"], state["nu"], self.groups)
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda o: isinstance(o, tuple))  # noqa: E731
        return pick(0), {"count": count, "mu": pick(1), "nu": pick(2)}


def ultralytics_ema_update(ema, new, d):
    """ModelEMA.update: ``torch._foreach_lerp_(ema, model, 1 - d)`` on every
    floating leaf (parameters and BatchNorm statistics), others copied."""
    w = 1.0 - jnp.asarray(d, jnp.float32)
    return jax.tree.map(lambda e, x: torch_lerp(e, x.astype(e.dtype), w) if jnp.issubdtype(e.dtype, jnp.floating) else x, ema, new)


def _positive_int(**values):
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
