"""Registers the toolkit's serializable Keras classes when a Keras engine is imported.

A `.keras` file names its classes (`tf_effitrain>GradientAccumulator`, ...), and Keras
looks them up by that name at load time, so they must be registered in a new process
before `load_model` runs: a `ModelCheckpoint` written by `fit` must reload after
`import tf_effitrain`. Registering means defining the classes for that engine, which
needs the engine imported, while `import tf_effitrain` itself stays light (no
TensorFlow). So registration is driven by `wrapt`'s post-import hooks: an engine is
*ready* once it and TensorFlow have finished importing (TensorFlow imports Keras 3
halfway through its own import, and Keras 3 imports TensorFlow), and a ready engine is
registered at the first moment none of the defining modules is halfway through its own
import (one of them may be what imported TensorFlow): checked when an engine becomes
ready and at the end of each defining module (`retry()`). tf_keras is never imported
by this: its classes register only in processes that import it.
"""

import importlib
import sys

__all__ = ["install_import_hooks", "register_engine", "retry"]

_NEEDS = {"keras": ("keras", "tensorflow"), "tf_keras": ("tf_keras", "tensorflow")}
# The modules that define serializable classes (imported by `register_engine`).
_DEFINING = ("tf_effitrain.engine", "tf_effitrain.models.layers",
             "tf_effitrain.optim.schedules", "tf_effitrain.optim.optimizers",
             "tf_effitrain.training.accumulation", "tf_effitrain.distill.distillation")
_ready, _done = set(), set()
_busy = []


def register_engine(keras):
    """Defines (and so registers) every serializable class of the toolkit for `keras`.

    Idempotent: the class factories are cached per engine.
    """
    from tf_effitrain.distill.distillation import distiller_class
    from tf_effitrain.engine import engine_name
    from tf_effitrain.models.layers import layers_for
    from tf_effitrain.optim.optimizers import lamb_class
    from tf_effitrain.optim.schedules import schedule_class
    from tf_effitrain.training.accumulation import accumulator_class

    layers_for(keras)
    schedule_class(keras)
    lamb_class(keras)
    accumulator_class(keras)
    distiller_class(keras)
    if engine_name(keras) == "tf_keras":
        # tfmot works on tf_keras models only: its per-update counter pins belong here.
        importlib.import_module("tf_effitrain.compress.hooks")


def _initializing(name):
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and getattr(spec, "_initializing", False)


def retry(finishing=None):
    """Registers the ready engines if no defining module is halfway through its import.

    Args:
        finishing: str or None. The module calling this as its last statement (it is
            still flagged as importing, but everything in it is defined).
    """
    if _busy or not (_ready - _done) or any(
            _initializing(m) for m in _DEFINING if m != finishing):
        return
    _busy.append(True)
    try:
        for engine in sorted(_ready - _done):
            _done.add(engine)
            try:
                register_engine(sys.modules[engine])
            except Exception as e:  # never break the user's `import keras`
                import warnings

                warnings.warn(f"tf_effitrain could not register its {engine} classes: "
                              f"{e!r}. Loading saved tf_effitrain models may fail.",
                              stacklevel=2)
    finally:
        _busy.pop()


def _on_import(importing):
    for engine, needed in _NEEDS.items():
        # The module whose hook fires has finished executing (it is still flagged).
        if all(n in sys.modules and (n == importing or not _initializing(n))
               for n in needed):
            _ready.add(engine)
    retry()


def install_import_hooks():
    """Registers each engine's classes once that engine (and TensorFlow) is imported."""
    import wrapt

    for name in ("tensorflow", "keras", "tf_keras"):
        wrapt.register_post_import_hook(lambda module, name=name: _on_import(name), name)
