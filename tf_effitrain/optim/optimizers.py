"""Optimizer construction: AdamW, Adafactor, LAMB, Lion, SGD in either engine.

Both engines provide AdamW, Adafactor, Lion and SGD. Keras 3 provides LAMB; tf_keras does
not, so `lamb_class(tf_keras)` adds one with the same update rule as Keras 3's `Lamb`
(decoupled weight decay applied by the base optimizer, layer-wise trust ratio).
"""

import functools

import tensorflow as tf

from tf_effitrain import _registry
from tf_effitrain.config.choices import OPTIMIZERS
from tf_effitrain.engine import engine_name, register_serializable
from tf_effitrain.optim.schedules import build_schedule

__all__ = ["build_optimizer", "lamb_class"]



@functools.lru_cache(maxsize=None)
def lamb_class(keras):
    """LAMB for `keras`: Keras 3's own `Lamb`, or an equivalent tf_keras optimizer."""
    if engine_name(keras) == "keras3":
        return keras.optimizers.Lamb

    @register_serializable(keras)
    class Lamb(keras.optimizers.Optimizer):
        """LAMB (You et al., 2019) for tf_keras, matching `keras.optimizers.Lamb`.

        Args:
            learning_rate: float or `LearningRateSchedule`.
            beta_1: float. First-moment decay.
            beta_2: float. Second-moment decay.
            epsilon: float. Added to the root of the second moment.
            **kwargs: base optimizer arguments (`weight_decay`, `global_clipnorm`, ...).
        """

        def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
                     epsilon=1e-7, name="Lamb", **kwargs):
            super().__init__(name=name, **kwargs)
            self._learning_rate = self._build_learning_rate(learning_rate)
            self.beta_1 = beta_1
            self.beta_2 = beta_2
            self.epsilon = epsilon

        def build(self, var_list):
            super().build(var_list)
            if getattr(self, "_built", False):
                return
            self._built = True
            self._momentums = [
                self.add_variable_from_reference(model_variable=v, variable_name="m")
                for v in var_list
            ]
            self._velocities = [
                self.add_variable_from_reference(model_variable=v, variable_name="v")
                for v in var_list
            ]

        def update_step(self, gradient, variable):
            if isinstance(gradient, tf.IndexedSlices):
                gradient = tf.convert_to_tensor(gradient)
            dtype = variable.dtype
            lr = tf.cast(self.learning_rate, dtype)
            step = tf.cast(self.iterations + 1, dtype)
            beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), step)
            beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), step)
            index = self._index_dict[self._var_key(variable)]
            m, v = self._momentums[index], self._velocities[index]
            m.assign_add((gradient - m) * (1 - self.beta_1))
            v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
            update = (m / (1.0 - beta_1_power)) / (
                tf.sqrt(v / (1.0 - beta_2_power)) + self.epsilon
            )
            w_norm = tf.norm(variable)
            u_norm = tf.norm(update)
            ratio = tf.where(
                w_norm > 0, tf.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0
            )
            variable.assign_sub(ratio * lr * update)

        def get_config(self):
            config = super().get_config()
            config.update({
                "learning_rate": self._serialize_hyperparameter(self._learning_rate),
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
            })
            return config

    return Lamb


def build_optimizer(optimizer_cfg, schedule_cfg, total_steps, keras):
    """Builds the configured optimizer with its warmup schedule.

    Create it inside `strategy.scope()` when training distributed.

    Args:
        optimizer_cfg: `OptimizerConfig`.
        schedule_cfg: `ScheduleConfig`.
        total_steps: int. Applied updates in the whole run (sizes warmup and decay).
        keras: the engine's `keras` module.

    Returns:
        A Keras optimizer of that engine; variables whose names contain one of
        `optimizer_cfg.exclude_from_weight_decay` get no weight decay.

    Example:

    ```python
    config = et.load_config("configs/demo_cpu.yaml")
    with strategy.scope():
        optimizer = et.build_optimizer(config.optimizer, config.schedule,
                                       total_steps=1000, keras=et.get_keras())
    ```
    """
    name = optimizer_cfg.name
    if name not in OPTIMIZERS:
        raise ValueError(f"`name` must be one of {OPTIMIZERS}. Received: name={name!r}")
    lr = build_schedule(schedule_cfg, optimizer_cfg.learning_rate, total_steps, keras)
    common = {"learning_rate": lr, "global_clipnorm": optimizer_cfg.global_clipnorm}
    if optimizer_cfg.ema_momentum is not None:
        common.update(use_ema=True, ema_momentum=optimizer_cfg.ema_momentum)
    # SGD and Adafactor take weight decay only as a base argument; keep it uniform.
    common["weight_decay"] = optimizer_cfg.weight_decay or None
    betas = {"beta_1": optimizer_cfg.beta_1, "beta_2": optimizer_cfg.beta_2}
    if name == "adamw":
        opt = keras.optimizers.AdamW(epsilon=optimizer_cfg.epsilon, **betas, **common)
    elif name == "lamb":
        opt = lamb_class(keras)(epsilon=optimizer_cfg.epsilon, **betas, **common)
    elif name == "lion":
        opt = keras.optimizers.Lion(**betas, **common)
    elif name == "adafactor":
        opt = keras.optimizers.Adafactor(**common)
    else:
        opt = keras.optimizers.SGD(momentum=optimizer_cfg.beta_1, **common)
    excluded = optimizer_cfg.exclude_from_weight_decay
    if optimizer_cfg.weight_decay and excluded:
        opt.exclude_from_weight_decay(var_names=list(excluded))
    return opt


# Defines serializable classes: register them if an engine was imported meanwhile.
_registry.retry(__name__)
