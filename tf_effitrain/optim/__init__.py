"""Optimizers and learning-rate schedules (counted in applied updates)."""

from tf_effitrain.config.choices import DECAYS, OPTIMIZERS
from tf_effitrain.optim.optimizers import build_optimizer, lamb_class
from tf_effitrain.optim.schedules import build_schedule, schedule_class, warmup_decay

__all__ = [
    "DECAYS",
    "OPTIMIZERS",
    "build_optimizer",
    "build_schedule",
    "lamb_class",
    "schedule_class",
    "warmup_decay",
]
