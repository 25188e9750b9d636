"""Callbacks: per-epoch metrics as JSON lines, and the default callback set of a run."""

import functools
import json
import os

from tf_effitrain.engine import next_learning_rate, scalar

__all__ = ["METRICS_FILE", "metrics_logger_class", "default_callbacks", "append_jsonl"]

METRICS_FILE = "metrics.jsonl"


def append_jsonl(path, record):
    """Appends one JSON record (floats rounded to 6 digits) as a line of `path`."""
    clean = {k: round(float(v), 6) if isinstance(v, float) else v for k, v in record.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean) + "\n")


@functools.lru_cache(maxsize=None)
def metrics_logger_class(keras):
    """The `MetricsLogger` callback class for one engine."""

    class MetricsLogger(keras.callbacks.Callback):
        """Appends `{"split": "train", "epoch", metrics..., "learning_rate",
        "updates"}` to a JSONL file at the end of every epoch.

        `updates` counts applied optimizer updates so far; `learning_rate` is the rate
        the next update will use.

        Args:
            path: str. The `metrics.jsonl` file, appended to (`train` starts a new one
                for each run).
        """

        def __init__(self, path):
            super().__init__()
            self.path = path

        def on_epoch_end(self, epoch, logs=None):
            opt = self.model.optimizer
            record = {"split": "train", "epoch": epoch + 1}
            record.update({k: float(v) for k, v in (logs or {}).items()
                           if k != "learning_rate"})
            record["learning_rate"] = next_learning_rate(opt)
            record["updates"] = int(scalar(opt.iterations))
            append_jsonl(self.path, record)

    return MetricsLogger


def default_callbacks(keras, run_dir, early_stopping_patience=None):
    """Metrics JSONL, TensorBoard logs, per-epoch weight checkpoints (and early stopping).

    Args:
        keras: the engine's `keras` module.
        run_dir: str. The run directory; writes `metrics.jsonl`, `logs/`, `checkpoints/`.
        early_stopping_patience: int or None. Stop after this many epochs without a
            lower validation loss, restoring the best weights.
    """
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    callbacks = [
        metrics_logger_class(keras)(os.path.join(run_dir, METRICS_FILE)),
        keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "logs")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(run_dir, "checkpoints", "epoch{epoch:03d}.weights.h5"),
            save_weights_only=True,
        ),
    ]
    if early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            patience=early_stopping_patience, restore_best_weights=True))
    return callbacks
