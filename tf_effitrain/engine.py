"""Keras engine resolution: `keras3` (default) or `tf_keras` (what tfmot needs).

This is the one module that knows the two Keras APIs differ. Everything else receives
the engine's `keras` module from `get_keras()` and builds with it.
"""

import importlib

__all__ = [
    "ENGINES",
    "get_keras",
    "engine_name",
    "register_serializable",
    "next_learning_rate",
]

ENGINES = ("keras3", "tf_keras")
_MODULES = {"keras3": "keras", "tf_keras": "tf_keras"}


def get_keras(engine="keras3"):
    """Returns the `keras` module of `engine` (`"keras3"` or `"tf_keras"`)."""
    if engine not in _MODULES:
        raise ValueError(
            f"`engine` must be one of {ENGINES}. Received: engine={engine!r}"
        )
    return importlib.import_module(_MODULES[engine])


def engine_name(keras):
    """The engine name of a `keras` module: `"keras3"` or `"tf_keras"`."""
    return "tf_keras" if keras.__name__.split(".")[0] == "tf_keras" else "keras3"


def register_serializable(keras, package="tf_effitrain"):
    """The engine's `register_keras_serializable` decorator."""
    return keras.saving.register_keras_serializable(package=package)


def next_learning_rate(optimizer):
    """The learning rate the optimizer's next update will use, as a Python float.

    The engines disagree on `optimizer.learning_rate` under a schedule: Keras 3 returns
    `schedule(iterations)` (the next update's rate), tf_keras the rate of the last
    update. Evaluating the schedule here gives one meaning in both.
    """
    lr = getattr(optimizer, "_learning_rate", None)
    if callable(lr) and not hasattr(lr, "numpy"):
        return float(lr(optimizer.iterations))
    return float(optimizer.learning_rate)
