"""Training: config, optax optimiser/schedule/EMA, the jitted sharded step, the loop, checkpoints."""

from jaxyolo.train.config import LOSSES, RECIPES, TrainConfig
from jaxyolo.train.loop import evaluate_checkpoint, load_session, train
from jaxyolo.train.optim import UltralyticsOptimizer, UltralyticsPlan, decay_mask, ema_decay, ema_tau_for, lr_schedule, make_optimizer
from jaxyolo.train.step import Session, make_objective

__all__ = [
    "LOSSES",
    "RECIPES",
    "Session",
    "TrainConfig",
    "UltralyticsOptimizer",
    "UltralyticsPlan",
    "decay_mask",
    "ema_decay",
    "ema_tau_for",
    "evaluate_checkpoint",
    "load_session",
    "lr_schedule",
    "make_objective",
    "make_optimizer",
    "train",
]
