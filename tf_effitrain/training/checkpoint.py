"""Training checkpoints that a killed run resumes from exactly.

A checkpoint is two files in `checkpoints/`: `ckpt-<batches>.npz` (every variable that
training changes: the model's weights, its dropout RNG states, the optimizer's slots,
iteration counter, loss scale and EMA) and `ckpt-<batches>.json` (the position in the
input stream, the callbacks' state, and what the data file must be). Both are written
under a temporary name, flushed and renamed, the JSON last: a checkpoint without its
JSON does not exist, and a kill during the write loses nothing but that checkpoint.
A truncated or damaged checkpoint (size, zip CRC) is reported and the previous one used.

The input position is the number of batches consumed: the training stream is a
deterministic function of the seed (`shuffle(seed=...)` over `repeat()`), so
`stream.skip(batches)` is where the run stopped.

`Checkpointing` makes any compiled model's `fit` resumable (it is what `train` uses);
`TrainingCheckpoint` is its Keras callback (every `every` updates and every epoch end,
atomic, keep the last K); `save_checkpoint` / `load_latest_checkpoint` are the pure
functions under them.
"""

import dataclasses
import functools
import glob
import json
import math
import os
import re
import time
import zipfile

import numpy as np

from tf_effitrain.errors import RunDirError
from tf_effitrain.training.rundir import atomic_write

__all__ = ["CHECKPOINT_DIR", "Checkpointing", "ResumePoint", "state_variables",
           "save_checkpoint", "load_latest_checkpoint", "list_checkpoints",
           "checkpoint_callback_class", "partial_epoch_class", "CheckpointError", "CheckpointMismatch"]

CHECKPOINT_DIR = "checkpoints"
_FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d+)\.json$")


class CheckpointError(Exception):
    """A checkpoint that cannot be read (truncated, damaged): the previous one is used."""


class CheckpointMismatch(RunDirError):
    """A readable checkpoint of another model, optimizer or batch layout: resuming from
    it (or from an older one) would be wrong, so it is an error, not a fallback."""


@dataclasses.dataclass
class ResumePoint:
    """Where a checkpoint left training.

    Args:
        path: str. The checkpoint's JSON file.
        batches: int. Training batches consumed (the input stream's position).
        epoch: int. Epochs completed.
        batch_in_epoch: int. Batches of epoch `epoch + 1` already trained (0 at an
            epoch end).
        updates: int. The optimizer's iteration counter.
        state: dict. The whole JSON record (callback states, metrics file size).
    """

    path: str
    batches: int
    epoch: int
    batch_in_epoch: int
    updates: int
    state: dict


def _name(v):
    return getattr(v, "path", None) or v.name


def state_variables(trainable):
    """Every variable `fit` changes, in a stable order: the model's (with Keras 3 seed
    generator states), tf_keras RNG generator states, then the optimizer's (with an
    inner optimizer's and the loss scale's)."""
    seen, out = set(), []

    def add(variables):
        for v in variables:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)

    add(trainable.variables)
    flatten = getattr(trainable, "_flatten_layers", None)
    if flatten is not None:  # tf_keras: dropout draws from tf.random.Generator states
        for layer in flatten():
            rng = getattr(layer, "_random_generator", None)
            generator = getattr(rng, "_generator", None)
            if generator is not None:
                add([generator.state])
    optimizer = trainable.optimizer
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is not None:
            add(opt.variables() if callable(getattr(opt, "variables", None))
                else opt.variables)
    scale = getattr(optimizer, "_loss_scale", None)  # tf_keras dynamic loss scale
    if scale is not None:
        add([getattr(scale, n) for n in ("_current_loss_scale", "_counter")
             if hasattr(scale, n)])
    return out


def _to_numpy(v):
    import tensorflow as tf

    return np.asarray(tf.convert_to_tensor(v))


def _encode(array):
    """numpy arrays savez can hold: bfloat16 travels as its uint16 bits."""
    if array.dtype.name == "bfloat16":
        return array.view(np.uint16), "bfloat16"
    return array, array.dtype.name


def _decode(array, dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array


def list_checkpoints(directory):
    """The checkpoints' JSON files in `directory`, newest (most batches) first."""
    found = []
    for path in glob.glob(os.path.join(directory, "ckpt-*.json")):
        match = _NAME.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(directory, variables, state, keep=2, values=None):
    """Writes one checkpoint atomically and keeps the newest `keep`.

    Args:
        directory: str. The checkpoints directory (created if missing).
        variables: list of variables (`state_variables`).
        state: dict. JSON-serializable; must hold `batches` (the input position).
        keep: int. Checkpoints kept, newest first (older ones are deleted).
        values: list of numpy arrays or None. The variables' values, if already read.

    Returns:
        The JSON file's path.
    """
    os.makedirs(directory, exist_ok=True)
    values = values if values is not None else [_to_numpy(v) for v in variables]
    stem = os.path.join(directory, f"ckpt-{int(state['batches']):09d}")
    encoded = [_encode(a) for a in values]
    atomic_write(stem + ".npz",
                 lambda f: np.savez(f, **{f"v{i}": a for i, (a, _) in enumerate(encoded)}))
    record = {"format": _FORMAT, **state,
              "data_file": os.path.basename(stem + ".npz"),
              "data_bytes": os.path.getsize(stem + ".npz"),
              "variables": [[_name(v), list(a.shape), dtype]
                            for v, (a, dtype) in zip(variables, encoded)]}
    atomic_write(stem + ".json", lambda f: f.write(json.dumps(record).encode("utf-8")))
    for old in list_checkpoints(directory)[keep:]:
        os.remove(old)  # the JSON first: a checkpoint without it is already gone
        data = old[: -len(".json")] + ".npz"
        if os.path.exists(data):
            os.remove(data)
    for stray in glob.glob(os.path.join(directory, "*.tmp-*")):
        os.remove(stray)  # a write killed half way
    _remove_unreferenced_best(directory)
    return stem + ".json"


def _remove_unreferenced_best(directory):
    """Deletes `best-*.npz` files no kept checkpoint refers to."""
    used = set()
    for path in list_checkpoints(directory):
        try:
            with open(path, encoding="utf-8") as f:
                used.add(json.load(f)["callbacks"]["best_weights"]["file"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for path in glob.glob(os.path.join(directory, "best-*.npz")):
        if os.path.basename(path) not in used:
            os.remove(path)


def _read(path, variables):
    """The record and arrays of one checkpoint; `CheckpointError` if it is unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        data = os.path.join(os.path.dirname(path), record["data_file"])
        size = os.path.getsize(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable ({type(e).__name__}: {e})") from None
    if size != record.get("data_bytes"):
        raise CheckpointError(f"{record['data_file']} has {size} bytes, "
                              f"{record.get('data_bytes')} were written (truncated)")
    expected = record.get("variables", [])
    if len(expected) != len(variables) or any(
            list(v.shape) != shape for v, (_, shape, _) in zip(variables, expected)):
        raise CheckpointMismatch(
            f"{path} holds {len(expected)} variables that do not fit this model's "
            f"{len(variables)} (another architecture, optimizer or precision). Resume "
            "with the config that wrote it, or start over (`--overwrite`).")
    try:
        with np.load(data, allow_pickle=False) as npz:
            arrays = [_decode(npz[f"v{i}"], dtype)  # reading checks each member's CRC
                      for i, (_, _, dtype) in enumerate(expected)]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{record['data_file']} is damaged ({e})") from None
    return record, arrays


def _set_aside(path):
    """Renames a damaged checkpoint's files to `*.damaged` (kept for inspection, out of
    the newest-first order new checkpoints are pruned by)."""
    for name in (path, path[: -len(".json")] + ".npz"):
        if os.path.exists(name):
            os.replace(name, name + ".damaged")


def load_latest_checkpoint(directory, variables, log=print, expect=None):
    """Restores the newest usable checkpoint into `variables`.

    A damaged or truncated checkpoint is reported through `log`, set aside
    (`*.damaged`) and the next older one tried.

    Args:
        directory: str. The checkpoints directory.
        variables: list of variables (`state_variables`).
        log: callable. Progress lines.
        expect: dict or None. Values the checkpoint's JSON must hold for the input
            position to mean the same (e.g. `{"global_batch": 64, "steps_per_epoch":
            100}`); a difference raises `CheckpointMismatch`.

    Returns:
        A `ResumePoint`, or None when there is no usable checkpoint.

    Raises:
        CheckpointMismatch: the newest readable checkpoint is of another model or
            batch layout.
    """
    for path in list_checkpoints(directory):
        try:
            record, arrays = _read(path, variables)
        except CheckpointError as e:
            log(f"checkpoint: {os.path.basename(path)} skipped: {e}")
            _set_aside(path)
            continue
        for key, value in (expect or {}).items():
            if key in record and record[key] != value:
                raise CheckpointMismatch(
                    f"{path} was written with {key}={record[key]}, this run has "
                    f"{key}={value}: its input position would not be where it stopped. "
                    "Resume with the same replicas and batch settings, or start over "
                    "(`--overwrite`).")
        for v, a in zip(variables, arrays):
            v.assign(a)
        return ResumePoint(path=path, batches=int(record["batches"]),
                           epoch=int(record["epoch"]),
                           batch_in_epoch=int(record["batch_in_epoch"]),
                           updates=int(record.get("updates", record["batches"])),
                           state=record)
    return None


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


@functools.lru_cache(maxsize=None)
def partial_epoch_class(keras):
    """The `PartialEpoch` callback class for one engine."""

    class PartialEpoch(keras.callbacks.Callback):
        """Ends the first epoch of a resumed run after its remaining `steps`, so the
        epochs after it line up with an uninterrupted run's. Put it first in the list:
        it clears the stop it requested before the other callbacks' `on_epoch_end`.

        Args:
            steps: int. Training steps left in the first epoch.
        """

        def __init__(self, steps):
            super().__init__()
            self.steps = steps
            self._seen = 0
            self._begin = 0
            self._fired = False
            self._done = False

        def on_train_batch_begin(self, batch, logs=None):
            self._begin = batch

        def on_train_batch_end(self, batch, logs=None):
            if self._done:
                return
            self._seen += batch - self._begin + 1  # steps_per_execution steps a call
            if self._seen >= self.steps:
                self.model.stop_training = True
                self._fired = True

        def on_epoch_end(self, epoch, logs=None):
            if self._fired:
                self.model.stop_training = False
            self._done = True

    return PartialEpoch


@functools.lru_cache(maxsize=None)
def checkpoint_callback_class(keras):
    """The `TrainingCheckpoint` callback class for one engine."""

    class TrainingCheckpoint(keras.callbacks.Callback):
        """Saves resumable checkpoints every `every` updates and at every epoch end;
        stops training on a non-finite loss and on a requested stop (a signal).

        Put it after the callbacks whose state it saves (`BestWeights`,
        `EarlyStopping`, the metrics logger): at an epoch end it records their state
        for that epoch.

        Args:
            directory: str. Where the checkpoints are written.
            steps_per_epoch: int. Batches per epoch.
            every: int or None. Also save every this many batches (None: epoch ends
                only).
            keep: int. Checkpoints kept.
            start: `ResumePoint` or None. The checkpoint training resumes from.
            write: bool. Whether this process writes (False on non-chief workers).
            metrics_path: str or None. `metrics.jsonl`, whose size each checkpoint
                records (a resumed run cuts it back to that size).
            best_weights: `BestWeights` or None. Its state (and kept weights) travel
                with the checkpoints.
            early_stopping: `EarlyStopping` or None. Its counters travel too.
            extra_state: dict or None. Recorded in every checkpoint's JSON (e.g. the
                global batch, checked on resume).
            nonfinite: str. `"stop"`: a NaN/Inf loss stops training (no checkpoint of
                that state is written); `"warn"`: log it and go on.
            log: callable. Progress lines.
        """

        def __init__(self, directory, steps_per_epoch, every=None, keep=2, start=None,
                     write=True, metrics_path=None, best_weights=None,
                     early_stopping=None, nonfinite="stop", extra_state=None, log=print):
            super().__init__()
            if nonfinite not in ("stop", "warn"):
                raise ValueError("`nonfinite` must be 'stop' or 'warn'. "
                                 f"Received: nonfinite={nonfinite!r}")
            self.directory = directory
            self.steps_per_epoch = steps_per_epoch
            self.every = every
            self.keep = keep
            self.start = start
            self.write = write
            self.metrics_path = metrics_path
            self.best_weights = best_weights
            self.early_stopping = early_stopping
            self.nonfinite = nonfinite
            self.extra_state = dict(extra_state or {})
            self.log = log
            self.batches = start.batches if start else 0
            self.epoch = start.epoch if start else 0
            self.batch_in_epoch = start.batch_in_epoch if start else 0
            self.stop_reason = None  # "nonfinite" or a signal name
            self.nonfinite_update = None
            self.last_path = start.path if start else None
            self.last_updates = start.updates if start else None
            self._best_written = None
            self._signal_saved = False
            self.seconds = 0.0
            self.saves = 0
            self._begin = 0
            self._warned = False
            self._variables = None

        def request_stop(self, reason):
            """Save at the next batch end and stop (e.g. from a signal handler)."""
            if self.stop_reason is None:
                self.stop_reason = reason

        # -- callback state that travels with a checkpoint ----------------------------
        def _callback_state(self):
            state = {}
            bw = self.best_weights
            if bw is not None:
                state["best_weights"] = {"best": bw.best, "best_epoch": bw.best_epoch}
                if bw._weights is not None:
                    # One file per best epoch: an older checkpoint keeps its own.
                    name = f"best-{bw.best_epoch:04d}.npz"
                    path = os.path.join(self.directory, name)
                    if self._best_written != bw.best_epoch or not os.path.exists(path):
                        os.makedirs(self.directory, exist_ok=True)
                        self._best_written = bw.best_epoch
                        atomic_write(path, lambda f: np.savez(
                            f, **{f"v{i}": _encode(np.asarray(w))[0]
                                  for i, w in enumerate(bw._weights)}))
                    state["best_weights"]["file"] = name
            es = self.early_stopping
            if es is not None:
                best = getattr(es, "best", None)
                state["early_stopping"] = {
                    "wait": int(es.wait), "stopped_epoch": int(es.stopped_epoch),
                    "best": None if best is None or not _finite(best) else float(best),
                    "best_epoch": int(getattr(es, "best_epoch", 0) or 0)}
            return state

        def _restore_callback_state(self, state):
            bw, saved = self.best_weights, state.get("best_weights")
            if bw is not None and saved and saved.get("file"):
                weights = bw.model.get_weights()
                # Beside the checkpoint (on a non-chief worker: the chief's directory).
                folder = os.path.dirname(self.start.path)
                try:
                    with np.load(os.path.join(folder, saved["file"])) as npz:
                        bw._weights = [_decode(npz[f"v{i}"], w.dtype.name)
                                       for i, w in enumerate(weights)]
                    bw.best, bw.best_epoch = saved["best"], saved["best_epoch"]
                    self._best_written = bw.best_epoch
                except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
                    # The best epoch is then chosen among the epochs still to come.
                    self.log(f"checkpoint: best weights {saved['file']} unreadable ({e}); "
                             "the best epoch is chosen again from here on")
            es, saved = self.early_stopping, state.get("early_stopping")
            if es is not None and saved:
                es.wait, es.stopped_epoch = saved["wait"], saved["stopped_epoch"]
                if saved.get("best") is not None:
                    es.best = saved["best"]
                if hasattr(es, "best_epoch"):
                    es.best_epoch = saved.get("best_epoch", 0)

        # -- saving ---------------------------------------------------------------------
        def save(self):
            """Writes a checkpoint of the current state; returns its path (None if this
            process does not write, or the weights are not finite)."""
            start = time.perf_counter()
            if self._variables is None:
                self._variables = state_variables(self.model)
            values = [_to_numpy(v) for v in self._variables]
            bad = next((_name(v) for v, a in zip(self._variables, values)
                        if a.dtype.kind == "f" or a.dtype.name == "bfloat16"
                        if not np.isfinite(a.astype(np.float32)).all()), None)
            if bad is not None:
                self.log(f"checkpoint: not written, {bad} holds NaN/Inf after update "
                         f"{self.updates()}")
                if self.nonfinite == "stop":
                    self.stop_reason = self.stop_reason or "nonfinite"
                    self.nonfinite_update = self.nonfinite_update or self.updates()
                    self.model.stop_training = True
                return None
            path = None
            if self.write:
                metrics = (os.path.getsize(self.metrics_path)
                           if self.metrics_path and os.path.exists(self.metrics_path) else 0)
                state = {"batches": self.batches, "epoch": self.epoch,
                         "batch_in_epoch": self.batch_in_epoch, "updates": self.updates(),
                         "steps_per_epoch": self.steps_per_epoch,
                         # Early stopping (or a plugin) ended training at this epoch.
                         "stopped": bool(self.batch_in_epoch == 0 and self.stop_reason is None
                                         and self.model.stop_training),
                         "metrics_bytes": metrics, "time": time.time(),
                         "callbacks": self._callback_state(), **self.extra_state}
                path = save_checkpoint(self.directory, self._variables, state, self.keep,
                                       values=values)
                self.last_path, self.last_updates = path, state["updates"]
            self.seconds += time.perf_counter() - start
            self.saves += 1
            return path

        def updates(self):
            from tf_effitrain.engine import scalar

            return int(scalar(self.model.optimizer.iterations))

        # -- hooks ----------------------------------------------------------------------
        def on_train_begin(self, logs=None):
            if self.start is not None:
                self._restore_callback_state(self.start.state.get("callbacks", {}))

        def on_epoch_begin(self, epoch, logs=None):
            if epoch != self.epoch:  # a new epoch (not the resumed one)
                self.epoch, self.batch_in_epoch = epoch, 0

        def on_train_batch_begin(self, batch, logs=None):
            self._begin = batch

        def on_train_batch_end(self, batch, logs=None):
            steps = batch - self._begin + 1
            before = self.batches
            self.batches += steps
            self.batch_in_epoch += steps
            loss = (logs or {}).get("loss")
            if loss is not None and not _finite(loss):
                if self.nonfinite == "stop":
                    self.stop_reason = "nonfinite"
                    self.nonfinite_update = self.updates()
                    self.model.stop_training = True
                    return
                if not self._warned:
                    self._warned = True
                    self.log(f"warning: non-finite loss at update {self.updates()}; "
                             "training goes on (`training.nonfinite: warn`)")
            end_of_epoch = self.batch_in_epoch >= self.steps_per_epoch
            if self.stop_reason is not None:
                # At an epoch's last batch the epoch-end checkpoint is the one to keep.
                if self.stop_reason != "nonfinite" and not end_of_epoch:
                    self.save()
                    self._signal_saved = True
                self.model.stop_training = True
                return
            if (self.every and self.batches // self.every > before // self.every
                    and not end_of_epoch):
                self.save()

        def on_epoch_end(self, epoch, logs=None):
            if self.stop_reason == "nonfinite" or self._signal_saved:
                self.model.stop_training = True  # over PartialEpoch's reset
                return
            # A whole epoch (a signal during its last batch or its validation included).
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            self.save()
            if self.stop_reason is not None:
                self.model.stop_training = True

    return TrainingCheckpoint


class Checkpointing:
    """Makes `fit` resumable: restores the newest good checkpoint of `directory` into a
    compiled model and its optimizer, and gives `fit` what it needs to continue exactly
    there (the input position, the initial epoch, the callbacks).

    Create it after `compile`; feed `fit` a dataset whose order depends only on its seed
    (e.g. `shuffle(seed=...)`, built anew for each run: a reused dataset object goes on
    to its seed's next orders), repeated, with `steps_per_epoch`.

    Args:
        model: a compiled Keras 3 or tf_keras model (or `GradientAccumulator`).
        directory: str. The checkpoints directory.
        steps_per_epoch: int. Batches per epoch of the `fit` call.
        every: int or None. Also save every this many batches.
        keep: int. Checkpoints kept.
        restore: bool. Restore the newest good checkpoint (False: start over, deleting
            the directory's checkpoints).
        write: bool. Whether this process writes (False on non-chief workers).
        read_directory: str or None. Where to restore from (default `directory`; a
            non-chief worker reads the chief's).
        log: callable. Progress lines (resume point, damaged checkpoints).
        expect: dict or None. Settings the input position depends on (besides
            `steps_per_epoch`), e.g. `{"global_batch": 64}`; recorded in every
            checkpoint and checked on restore (`CheckpointMismatch`).
        **callback_kwargs: passed to `TrainingCheckpoint` (`metrics_path`,
            `best_weights`, `early_stopping`, `nonfinite`).

    Example:

    ```python
    model.compile(optimizer="adamw", loss=loss, metrics=["accuracy"])
    ckpt = et.Checkpointing(model, "runs/mine/checkpoints", steps_per_epoch=100, every=50)
    model.fit(ckpt.dataset(train_ds.repeat()), epochs=10, steps_per_epoch=100,
              initial_epoch=ckpt.initial_epoch, callbacks=ckpt.callbacks([my_callback]))
    ```
    """

    def __init__(self, model, directory, steps_per_epoch, every=None, keep=2, restore=True,
                 write=True, read_directory=None, log=print, expect=None,
                 **callback_kwargs):
        from tf_effitrain.engine import keras_of

        self.model = model
        self.keras = keras_of(model)
        self.steps_per_epoch = steps_per_epoch
        expect = {**(expect or {}), "steps_per_epoch": steps_per_epoch}
        if restore:
            self.point = self._restore(read_directory or directory, log, expect)
        else:
            self.point = None
            if write:  # starting over: older checkpoints would outrank the new ones
                for path in glob.glob(os.path.join(directory, "ckpt-*")) + glob.glob(
                        os.path.join(directory, "best-*.npz")):
                    os.remove(path)
        self.callback = checkpoint_callback_class(self.keras)(
            directory, steps_per_epoch, every=every, keep=keep, start=self.point,
            write=write, log=log, extra_state=expect, **callback_kwargs)

    @property
    def stopped(self):
        """Whether the restored checkpoint is from an epoch where training was ended
        (early stopping): `fit` then has nothing left to do."""
        return bool(self.point is not None and self.point.state.get("stopped"))

    def _restore(self, directory, log, expect):
        optimizer = self.model.optimizer
        if optimizer is None:
            raise ValueError("Compile the model before creating `Checkpointing`: the "
                             "optimizer's state is part of a checkpoint.")
        with self.model.distribute_strategy.scope():
            # Slots must exist to receive the saved values (tf_keras says `_built`).
            if not getattr(optimizer, "built", getattr(optimizer, "_built", False)):
                optimizer.build(self.model.trainable_variables)
            return load_latest_checkpoint(directory, state_variables(self.model), log,
                                          expect=expect)

    @property
    def initial_epoch(self):
        """`fit`'s `initial_epoch`: the epoch the checkpoint was in (0 when fresh). When
        training had been stopped early, pass `epochs` instead (see `stopped`)."""
        return self.point.epoch if self.point is not None else 0

    def dataset(self, ds, batches_per_update=1):
        """`ds` (the repeated training stream) from the checkpoint's position on.

        Args:
            ds: `tf.data.Dataset`.
            batches_per_update: int. Elements of `ds` one update takes (a worker's
                own pipeline feeding several local replicas: one each).
        """
        if self.point is None:
            return ds
        return ds.skip(self.point.batches * batches_per_update)

    def callbacks(self, callbacks=()):
        """`callbacks` between the two this needs: the first resumed epoch's shortening
        first, the checkpoint callback after the callbacks whose state it records."""
        first = []
        if self.point is not None and self.point.batch_in_epoch:
            first = [partial_epoch_class(self.keras)(
                self.steps_per_epoch - self.point.batch_in_epoch)]
        return first + list(callbacks) + [self.callback]
