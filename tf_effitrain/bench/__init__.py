"""Benchmarks behind `tf-effitrain bench`: ratios measured within one run."""

from tf_effitrain.bench.accumulation import bench_accumulation, format_accumulation
from tf_effitrain.bench.compress import bench_compress, format_compress, plot_compress
from tf_effitrain.bench.distill import bench_distill, compare_runs, format_distill
from tf_effitrain.bench.precision import bench_precision, format_precision

__all__ = ["bench_accumulation", "bench_compress", "bench_distill", "bench_precision",
           "compare_runs", "format_accumulation", "format_compress", "format_distill",
           "format_precision", "plot_compress"]
