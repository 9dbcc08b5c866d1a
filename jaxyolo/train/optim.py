"""Optimiser, LR schedule and ModelEMA, following the YOLO recipe in optax."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from jaxyolo.train.config import TrainConfig

__all__ = ["lr_schedule", "make_optimizer", "decay_mask", "ema_decay", "ema_tau_for", "ema_update"]


def lr_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int):
    """Linear warmup 0 -> peak over ``max(warmup_epochs * steps_per_epoch,
    warmup_min_steps)`` steps (capped at half the run), then cosine or linear
    decay to ``peak * lrf`` at ``total_steps``.  ``peak = lr0`` (times
    ``batch / 64`` for YOLOX with SGD, its per-image LR rule; AdamW is
    invariant to the loss scale, so it takes ``lr0`` as is)."""
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


def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int):
    """``optax`` chain: optional global-norm clipping, then

    * ``"sgd"``: weight decay added to the gradient (torch SGD semantics) on
      conv kernels only, Nesterov momentum ``config.momentum``;
    * ``"adamw"``: decoupled weight decay on conv kernels only,
      ``b1 = config.momentum``, ``b2 = 0.999``;

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
    else:
        parts.append(optax.adamw(sched, b1=config.momentum, b2=0.999, weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched


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


