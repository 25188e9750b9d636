"""Model builders: Transformer encoder classifiers for both Keras engines."""

from tf_effitrain.models.layers import layers_for
from tf_effitrain.models.transformer import build_transformer_classifier, count_params

__all__ = ["build_transformer_classifier", "count_params", "layers_for"]
