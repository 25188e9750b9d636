"""Compression with tensorflow-model-optimization (tf_keras engine): imported lazily."""

from tf_effitrain.compress._tfmot import tfmot

__all__ = ["tfmot"]
