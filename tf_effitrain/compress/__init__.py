"""Compression: structured (heads, FFN neurons, low-rank kernels: a smaller model of the
same builder, both engines) and tensorflow-model-optimization pruning (unstructured, m:n)
and quantization-aware training (tf_keras engine). Imported lazily."""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "tfmot": "tf_effitrain.compress._tfmot",
    "pruning_steps": "tf_effitrain.compress.hooks",
    "pin_pruning_steps": "tf_effitrain.compress.hooks",
    "analytic_flops": "tf_effitrain.compress.structured",
    "factorize": "tf_effitrain.compress.structured",
    "prune_heads": "tf_effitrain.compress.structured",
    "prune_units": "tf_effitrain.compress.structured",
    "select_units": "tf_effitrain.compress.structured",
    "unit_scores": "tf_effitrain.compress.structured",
    "compress_run": "tf_effitrain.compress.run",
    "prune": "tf_effitrain.compress.pruning",
    "strip": "tf_effitrain.compress.pruning",
    "sparsity_table": "tf_effitrain.compress.pruning",
    "pruning_schedule": "tf_effitrain.compress.pruning",
    "pruning_wrappers": "tf_effitrain.compress.pruning",
    "quantize_aware": "tf_effitrain.compress.qat",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
