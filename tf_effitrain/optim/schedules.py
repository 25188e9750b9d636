"""Learning-rate schedules: linear warmup, then decay, counted in applied updates.

`warmup_decay` is the pure closed form; `WarmupDecay` is the thin
`LearningRateSchedule` for one engine (`schedule_class(keras)`). The optimizer calls
it with `optimizer.iterations`, which counts *applied* updates (our accumulating
train_step applies once per effective batch), so the schedule is per update.
"""

import functools
import math

import tensorflow as tf

from tf_effitrain import _registry
from tf_effitrain.config.choices import DECAYS
from tf_effitrain.engine import register_serializable

__all__ = ["warmup_decay", "schedule_class", "build_schedule"]



def warmup_decay(
    step, peak, warmup_steps=0, decay_steps=1, decay="cosine", alpha=0.0,
    decay_rate=0.1, power=1.0,
):
    """Learning rate after `step` applied updates (float32 tensor).

    Warmup: `peak * (step + 1) / warmup_steps` for `step < warmup_steps` (the first
    update already moves). Then with `t = step - warmup_steps` and
    `p = min(t, decay_steps) / decay_steps`:
    constant `peak`; cosine `peak * (alpha + (1 - alpha) * (1 + cos(pi p)) / 2)`;
    linear `peak * (1 - (1 - alpha) p)`; polynomial `peak * ((1 - alpha)(1 - p)^power +
    alpha)`; exponential `peak * decay_rate^(t / decay_steps)` (not clipped).
    """
    if decay not in DECAYS:
        raise ValueError(f"`decay` must be one of {DECAYS}. Received: decay={decay!r}")
    step = tf.cast(step, tf.float32)
    peak = tf.cast(peak, tf.float32)
    warmup = float(warmup_steps)
    t = tf.maximum(step - warmup, 0.0)
    p = tf.minimum(t, float(decay_steps)) / float(decay_steps)
    if decay == "constant":
        decayed = peak
    elif decay == "cosine":
        decayed = peak * (alpha + (1.0 - alpha) * 0.5 * (1.0 + tf.cos(math.pi * p)))
    elif decay == "linear":
        decayed = peak * (1.0 - (1.0 - alpha) * p)
    elif decay == "polynomial":
        decayed = peak * ((1.0 - alpha) * tf.pow(1.0 - p, power) + alpha)
    else:
        decayed = peak * tf.pow(float(decay_rate), t / float(decay_steps))
    if warmup_steps <= 0:
        return decayed
    warm = peak * tf.minimum((step + 1.0) / warmup, 1.0)
    return tf.where(step < warmup, warm, decayed)


@functools.lru_cache(maxsize=None)
def schedule_class(keras):
    """The `WarmupDecay` schedule class for one engine."""

    @register_serializable(keras)
    class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warmup to `peak_learning_rate`, then decay; see `warmup_decay`.

        Args:
            peak_learning_rate: float. Learning rate at the end of warmup.
            warmup_steps: int. Applied updates of warmup.
            decay_steps: int. Applied updates of decay after warmup.
            decay: str. `"constant"`, `"cosine"`, `"linear"`, `"exponential"` or
                `"polynomial"`.
            alpha: float. Final rate as a fraction of the peak.
            decay_rate: float. Exponential decay factor per `decay_steps`.
            power: float. Polynomial power.
        """

        def __init__(self, peak_learning_rate, warmup_steps=0, decay_steps=1,
                     decay="cosine", alpha=0.0, decay_rate=0.1, power=1.0):
            if decay_steps < 1:
                raise ValueError(
                    f"`decay_steps` must be an integer >= 1. Received: decay_steps={decay_steps}"
                )
            if warmup_steps < 0:
                raise ValueError(
                    f"`warmup_steps` must be an integer >= 0. Received: warmup_steps={warmup_steps}"
                )
            self.peak_learning_rate = peak_learning_rate
            self.warmup_steps = warmup_steps
            self.decay_steps = decay_steps
            self.decay = decay
            self.alpha = alpha
            self.decay_rate = decay_rate
            self.power = power

        def __call__(self, step):
            return warmup_decay(step, self.peak_learning_rate, self.warmup_steps,
                                self.decay_steps, self.decay, self.alpha,
                                self.decay_rate, self.power)

        def get_config(self):
            return {
                "peak_learning_rate": self.peak_learning_rate,
                "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps,
                "decay": self.decay,
                "alpha": self.alpha,
                "decay_rate": self.decay_rate,
                "power": self.power,
            }

    return WarmupDecay


def build_schedule(schedule_cfg, peak_learning_rate, total_steps, keras):
    """A `WarmupDecay` from a `ScheduleConfig` for a run of `total_steps` updates.

    Example:

    ```python
    schedule = build_schedule(ScheduleConfig(name="cosine", warmup_fraction=0.1),
                              peak_learning_rate=1e-3, total_steps=1000, keras=keras)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    ```
    """
    warmup = schedule_cfg.warmup_steps
    if warmup is None:
        warmup = int(round(schedule_cfg.warmup_fraction * total_steps))
    decay_steps = schedule_cfg.decay_steps or max(total_steps - warmup, 1)
    return schedule_class(keras)(
        peak_learning_rate, warmup_steps=warmup, decay_steps=decay_steps,
        decay=schedule_cfg.name, alpha=schedule_cfg.alpha,
        decay_rate=schedule_cfg.decay_rate, power=schedule_cfg.power,
    )


# Defines serializable classes: register them if an engine was imported meanwhile.
_registry.retry(__name__)
