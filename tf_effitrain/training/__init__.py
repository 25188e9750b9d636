"""Training recipe, callbacks and reports.

Names load on first use: `train` checks the config's data and run directory before
TensorFlow is imported.
"""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "accumulate": "tf_effitrain.training.accumulation",
    "accumulator_class": "tf_effitrain.training.accumulation",
    "micro_batch_bounds": "tf_effitrain.training.accumulation",
    "register_update_count_hook": "tf_effitrain.training.accumulation",
    "best_weights_class": "tf_effitrain.training.callbacks",
    "Checkpointing": "tf_effitrain.training.checkpoint",
    "checkpoint_callback_class": "tf_effitrain.training.checkpoint",
    "load_latest_checkpoint": "tf_effitrain.training.checkpoint",
    "save_checkpoint": "tf_effitrain.training.checkpoint",
    "state_variables": "tf_effitrain.training.checkpoint",
    "run_status": "tf_effitrain.training.rundir",
    "default_callbacks": "tf_effitrain.training.callbacks",
    "metrics_logger_class": "tf_effitrain.training.callbacks",
    "classification_metrics": "tf_effitrain.training.metrics",
    "confusion_matrix": "tf_effitrain.training.metrics",
    "macro_f1": "tf_effitrain.training.metrics",
    "plot_confusion_matrix": "tf_effitrain.training.metrics",
    "read_metrics": "tf_effitrain.training.report",
    "write_report": "tf_effitrain.training.report",
    "RunContext": "tf_effitrain.training.trainer",
    "RunResult": "tf_effitrain.training.trainer",
    "TrainerPlugin": "tf_effitrain.training.trainer",
    "evaluate_run": "tf_effitrain.training.trainer",
    "precision_policy": "tf_effitrain.training.trainer",
    "train": "tf_effitrain.training.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
