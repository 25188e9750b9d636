"""Benchmarks behind `tf-effitrain bench`: ratios measured within one run.

The suites are listed in `tf_effitrain.bench.suite.SUITES`. Names load on first use:
`tf-effitrain bench --help` answers without importing TensorFlow.
"""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "bench_accumulation": "tf_effitrain.bench.accumulation",
    "format_accumulation": "tf_effitrain.bench.accumulation",
    "bench_compress": "tf_effitrain.bench.compress",
    "format_compress": "tf_effitrain.bench.compress",
    "plot_compress": "tf_effitrain.bench.compress",
    "bench_distill": "tf_effitrain.bench.distill",
    "compare_runs": "tf_effitrain.bench.distill",
    "format_distill": "tf_effitrain.bench.distill",
    "bench_precision": "tf_effitrain.bench.precision",
    "format_precision": "tf_effitrain.bench.precision",
    "bench_recipe": "tf_effitrain.bench.recipe",
    "bench_mfu": "tf_effitrain.bench.mfu",
    "matmul_peak": "tf_effitrain.bench.mfu",
    "training_flops": "tf_effitrain.bench.mfu",
    "bench_inference": "tf_effitrain.bench.inference",
    "run_bench": "tf_effitrain.bench.suite",
    "SUITES": "tf_effitrain.bench.suite",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
