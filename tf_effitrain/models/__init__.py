"""Model builders: Transformer encoder classifiers for both Keras engines. Imported
lazily (PEP 562): `models.names` needs no TensorFlow."""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "build_transformer_classifier": "tf_effitrain.models.transformer",
    "count_params": "tf_effitrain.models.transformer",
    "layers_for": "tf_effitrain.models.layers",
    "named_layers": "tf_effitrain.models.names",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
