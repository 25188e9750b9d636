"""The only place `tensorflow_model_optimization` is imported.

Importing tfmot sets `TF_USE_LEGACY_KERAS=1` for the whole process, and tfmot works only
on tf_keras models. This toolkit never relies on TensorFlow's `keras` alias (it imports
`keras` or `tf_keras` explicitly), so the flip cannot change our models; the import
checks that tfmot bound itself to tf_keras.
"""

import functools
import os

__all__ = ["tfmot", "tfmot_internal"]


@functools.lru_cache(maxsize=None)
def tfmot():
    """The `tensorflow_model_optimization` module, imported on first use."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow_model_optimization as module
    from tensorflow_model_optimization.python.core.keras import compat

    bound = getattr(compat.keras, "__name__", "")
    if not bound.startswith("tf_keras"):
        raise RuntimeError(
            "tensorflow-model-optimization bound itself to Keras module "
            f"{bound!r}, not tf_keras, so it cannot prune or quantize this toolkit's "
            "tf_keras models. Set TF_USE_LEGACY_KERAS=1 before starting Python."
        )
    return module


def tfmot_internal(name):
    """A tfmot module that the public API does not export, e.g.
    `"sparsity.keras.pruning_wrapper"` (the `PruneLowMagnitude` class to subclass)."""
    import importlib

    tfmot()
    return importlib.import_module(f"tensorflow_model_optimization.python.core.{name}")
