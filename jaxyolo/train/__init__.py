"""Training: config, optax optimiser/schedule/EMA, the jitted loop, checkpoints."""

from jaxyolo.train.config import LOSSES, TrainConfig
from jaxyolo.train.loop import Session, evaluate_checkpoint, make_objective, train
from jaxyolo.train.optim import decay_mask, ema_decay, ema_tau_for, lr_schedule, make_optimizer

__all__ = [
    "LOSSES",
    "Session",
    "TrainConfig",
    "decay_mask",
    "ema_decay",
    "ema_tau_for",
    "evaluate_checkpoint",
    "lr_schedule",
    "make_objective",
    "make_optimizer",
    "train",
]
