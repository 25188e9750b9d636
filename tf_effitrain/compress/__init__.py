"""Compression with tensorflow-model-optimization (tf_keras engine): imported lazily."""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "tfmot": "tf_effitrain.compress._tfmot",
    "pruning_steps": "tf_effitrain.compress.hooks",
    "pin_pruning_steps": "tf_effitrain.compress.hooks",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
