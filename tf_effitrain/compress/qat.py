"""Quantization-aware training (tfmot) of the builder's tf_keras Transformer.

What is fake-quantized during training, and why:

- **Dense kernels and activations** (attention query/key/value/output projections, FFN,
  embedding projection, classifier head): tfmot's default 8-bit scheme, per-channel
  weights. These are the matmuls that run in int8 after conversion.
- **Not annotated**: the token and position embeddings (their input is int32 token ids;
  `FakeQuant` of an int32 tensor fails, and an embedding lookup is a gather that the
  converter quantizes from calibration), LayerNormalization / RMS norm and the
  attention core's softmax (tfmot has no QuantizeConfig for them; the converter
  quantizes them post-training from the representative dataset, and the core's masking
  keeps every tensor's range to a few units, see `models/layers.py`).

Pruning-preserving QAT (tfmot's `Default8BitPrunePreserveQuantizeScheme`) is used for a
model whose kernels hold pruned zeros: the zeros stay zeros through QAT.
"""

import contextlib

from tf_effitrain.compress._tfmot import tfmot, tfmot_internal
from tf_effitrain.training.accumulation import register_micro_loop_scope

__all__ = ["quantize_aware", "QAT_LAYER_KINDS"]

QAT_LAYER_KINDS = ("Dense",)
# A kernel with this share of exact zeros was pruned (trained weights are never exactly
# zero otherwise).
SPARSE_SHARE = 0.1


def _check_model(model):
    import tf_keras

    if hasattr(model, "accumulation_steps") and isinstance(getattr(model, "model", None),
                                                          tf_keras.Model):
        raise ValueError("Quantize the model, then wrap it: `et.accumulate("
                         "et.quantize_aware(model), k)` (or pass `accumulator.model`). "
                         "Received: a gradient accumulator.")
    if not isinstance(model, tf_keras.Model) or not getattr(model, "_is_graph_network", False):
        raise ValueError(
            "Quantization-aware training needs a functional tf_keras model (tfmot does not "
            "support Keras 3). Build it with `keras=et.get_keras('tf_keras')`, or run "
            "`tf-effitrain compress RUN_DIR --set compression.qat=true` on a Keras 3 run. "
            f"Received: {type(model).__module__}.{type(model).__name__}")
    from tf_effitrain.compress.pruning import pruning_wrappers

    if pruning_wrappers(model):
        raise ValueError("Strip the pruning wrappers first (`et.strip(model)`); QAT then "
                         "keeps the pruned zeros (`preserve_sparsity=True`). Received: a "
                         f"model with {len(pruning_wrappers(model))} pruning wrappers")


def quantize_aware(model, preserve_sparsity=None):
    """A QAT copy of a tf_keras model: its Dense layers fake-quantized to int8.

    Args:
        model: a functional tf_keras model (e.g. the builder's, or a stripped pruned
            model).
        preserve_sparsity: bool or None. Keep the kernels' zeros through QAT
            (pruning-preserving QAT); None: when any Dense kernel is >= 10% exact zeros
            (trained weights are never exactly zero unless pruned).

    Returns:
        A new tf_keras model with `QuantizeWrapperV2` layers, weights copied from
        `model`. Compile and fit it as usual; convert with
        `et.export_tflite(qat_model, path, "int8", representative_data=...)`.

    Example:

    ```python
    qat = et.quantize_aware(model)
    qat.compile(optimizer=..., loss=..., metrics=["accuracy"])
    qat.fit(train, epochs=1)
    et.export_tflite(qat, "model_int8.tflite", "int8", representative_data=train,
                     sequence_length=128)
    ```
    """
    import tf_keras

    _check_model(model)
    quant = tfmot().quantization.keras
    if preserve_sparsity is None:
        preserve_sparsity = _mostly_sparse(model)

    def annotate(layer):
        if type(layer).__name__ in QAT_LAYER_KINDS:
            return quant.quantize_annotate_layer(layer)
        return layer

    with quant.quantize_scope():
        annotated = tf_keras.models.clone_model(model, clone_function=annotate)
        if preserve_sparsity:
            return quant.quantize_apply(annotated, _prune_preserve_scheme())
        return quant.quantize_apply(annotated)


def _prune_preserve_scheme():
    """tfmot's pruning-preserving 8-bit scheme, with the default registry's notion of a
    supported layer: the prune-preserve registry calls every weightless layer
    supported, then fails on weightless custom layers (the attention core) that follow
    an annotated Dense (`get_quantize_config() called on an unsupported layer`)."""
    scheme = tfmot().experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    default = tfmot_internal("quantization.keras.default_8bit.default_8bit_quantize_registry")
    registry = scheme.get_quantize_registry()
    own = registry.supports
    registry.supports = lambda layer: own(layer) and default.Default8BitQuantizeRegistry().supports(layer)
    scheme.get_quantize_registry = lambda: registry
    return scheme


def _mostly_sparse(model, threshold=SPARSE_SHARE):
    import numpy as np

    for layer in model.layers:
        if type(layer).__name__ == "Dense":
            kernel = np.asarray(layer.kernel.numpy())
            if np.mean(kernel == 0) >= threshold:
                return True
    return False


@register_micro_loop_scope
@contextlib.contextmanager
def _ranges_outside_loop(model):
    """While the accumulator traces its micro-batch loop: quantize wrappers run with
    `training=False` (no range update). tfmot updates its moving-average activation
    ranges through `merge_call`, which cannot run inside the loop's `while_loop` under a
    strategy; the first micro-batch of each update, outside the loop, updates them once
    (a moving average over updates instead of over micro-batches)."""
    from tf_effitrain.compress.pruning import layers_within

    wrappers = [layer for layer in layers_within(model) if hasattr(layer, "quantize_config")]
    for wrapper in wrappers:
        wrapper.call = _inference_call(wrapper.call)
    try:
        yield
    finally:
        for wrapper in wrappers:
            del wrapper.call  # the class's method again


def _inference_call(call):
    def run(inputs, training=None, **kwargs):
        return call(inputs, training=False, **kwargs)
    return run
