"""Benchmarks behind `tf-effitrain bench`: ratios measured within one run."""

from tf_effitrain.bench.accumulation import bench_accumulation, format_accumulation

__all__ = ["bench_accumulation", "format_accumulation"]
