"""Callbacks: per-epoch metrics as JSON lines, best-epoch weights, and the default set."""

import functools
import json
import math
import os
import time

from tf_effitrain.engine import next_learning_rate, scalar

__all__ = ["METRICS_FILE", "metrics_logger_class", "best_weights_class", "best_is_lower",
           "default_callbacks", "append_jsonl"]

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
        """Appends `{"split": "train", "epoch", "epoch_seconds", metrics...,
        "learning_rate", "updates"}` to a JSONL file at the end of every epoch.

        `updates` counts applied optimizer updates so far; `learning_rate` is the rate
        the next update will use.

        Args:
            path: str. The `metrics.jsonl` file, appended to (`train` starts a new one
                for each run).
        """

        def __init__(self, path):
            super().__init__()
            self.path = path
            self._epoch_start = None

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            opt = self.model.optimizer
            record = {"split": "train", "epoch": epoch + 1}
            if self._epoch_start is not None:
                # Training and validation of this epoch (the first includes tracing).
                record["epoch_seconds"] = time.perf_counter() - self._epoch_start
            record.update({k: float(v) for k, v in (logs or {}).items()
                           if k != "learning_rate"})
            record["learning_rate"] = next_learning_rate(opt)
            record["updates"] = int(scalar(opt.iterations))
            append_jsonl(self.path, record)

    return MetricsLogger


def best_is_lower(monitor):
    """Whether lower values of the metric `monitor` are better (losses and errors)."""
    return any(word in monitor for word in ("loss", "error"))


@functools.lru_cache(maxsize=None)
def best_weights_class(keras):
    """The `BestWeights` callback class for one engine."""

    class BestWeights(keras.callbacks.Callback):
        """Keeps the weights of the epoch with the best `monitor` and restores them when
        training ends, so the model that is saved and evaluated is the best one seen.

        Unlike `EarlyStopping(restore_best_weights=True)`, it restores even when
        training runs all its epochs, and tells which epoch it kept (`best_epoch`,
        1-based; None before any epoch reported `monitor`). On ties the earlier epoch
        is kept; a NaN value is never best.

        With an optimizer that keeps a weight EMA (`use_ema`), `fit` ends by copying
        the averages into the model; so the weights kept for the best epoch are that
        epoch's averages too (the epoch is chosen by `monitor`, computed by `fit` on
        the raw weights).

        Args:
            monitor: str. A validation metric in the epoch logs, e.g. `"val_loss"`.
            mode: str. `"min"`, `"max"` or `"auto"` (min for losses, else max).
        """

        def __init__(self, monitor="val_loss", mode="auto"):
            super().__init__()
            if mode not in ("auto", "min", "max"):
                raise ValueError(
                    f"`mode` must be 'auto', 'min' or 'max'. Received: mode={mode!r}")
            self.monitor = monitor
            self.lower_is_better = best_is_lower(monitor) if mode == "auto" else mode == "min"
            self.best = None
            self.best_epoch = None
            self.epochs_seen = 0
            self._weights = None

        def on_train_begin(self, logs=None):
            self.best = self.best_epoch = self._weights = None
            self.epochs_seen = 0

        def _snapshot(self):
            optimizer = getattr(self.model, "optimizer", None)
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            if not getattr(inner, "use_ema", False):
                return self.model.get_weights()
            # The averages, in the model's weight order: swap them in, read, swap back.
            raw = self.model.get_weights()
            inner.finalize_variable_values(self.model.trainable_variables)
            averaged = self.model.get_weights()
            self.model.set_weights(raw)
            return averaged

        def on_epoch_end(self, epoch, logs=None):
            self.epochs_seen = epoch + 1
            value = (logs or {}).get(self.monitor)
            if value is None or math.isnan(float(value)):
                return
            value = float(value)
            better = self.best is None or (
                value < self.best if self.lower_is_better else value > self.best)
            if better:
                self.best, self.best_epoch = value, epoch + 1
                self._weights = self._snapshot()

        def on_train_end(self, logs=None):
            if self._weights is not None:
                self.model.set_weights(self._weights)
            self._weights = None  # a copy of every weight: free it

    return BestWeights


def default_callbacks(keras, run_dir, early_stopping_patience=None, monitor="val_loss",
                      keep_best=True, epoch_weights=True):
    """Metrics JSONL, TensorBoard logs, per-epoch weight checkpoints, best weights (and
    early stopping).

    Args:
        keras: the engine's `keras` module.
        run_dir: str. The run directory; writes `metrics.jsonl`, `logs/`, `checkpoints/`.
        early_stopping_patience: int or None. Stop after this many epochs without an
            improvement of `monitor`.
        monitor: str. The validation metric that picks the best epoch.
        keep_best: bool. Add a `BestWeights` callback: training ends with the weights of
            the best epoch by `monitor`. Needs validation data in `fit`.
        epoch_weights: bool. Save `checkpoints/epochNNN.weights.h5` after every epoch
            (`train` writes resumable checkpoints there instead, see
            `checkpoint_callback_class`).

    Example:

    ```python
    model.fit(train_ds, validation_data=val_ds, epochs=10,
              callbacks=et.default_callbacks(keras, "runs/mine", monitor="val_accuracy"))
    ```
    """
    callbacks = [
        metrics_logger_class(keras)(os.path.join(run_dir, METRICS_FILE)),
        keras.callbacks.TensorBoard(log_dir=os.path.join(run_dir, "logs")),
    ]
    if epoch_weights:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(run_dir, "checkpoints", "epoch{epoch:03d}.weights.h5"),
            save_weights_only=True))
    if keep_best:
        callbacks.append(best_weights_class(keras)(monitor))
    if early_stopping_patience:
        # The best weights are BestWeights' job (it restores even without a stop).
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, patience=early_stopping_patience,
            mode="min" if best_is_lower(monitor) else "max"))
    return callbacks
