"""Training recipe, callbacks and reports."""

from tf_effitrain.training.accumulation import accumulate, accumulator_class, micro_batch_bounds
from tf_effitrain.training.callbacks import default_callbacks, metrics_logger_class
from tf_effitrain.training.report import read_metrics, write_report
from tf_effitrain.training.trainer import evaluate_run, precision_policy, train

__all__ = [
    "accumulate",
    "accumulator_class",
    "default_callbacks",
    "evaluate_run",
    "metrics_logger_class",
    "micro_batch_bounds",
    "precision_policy",
    "read_metrics",
    "train",
    "write_report",
]
