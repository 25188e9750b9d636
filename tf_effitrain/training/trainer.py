"""The recipe behind `tf-effitrain train` and `evaluate`: config in, run directory out.

A run is a sequence of named stages over one `RunContext`:

    check_inputs -> strategy -> data -> model -> trainable -> fit -> finish -> report

Methods that change the recipe plug in through `TrainerPlugin` hooks instead of editing
the stages: compression wraps the model (`transform_model`) and strips it
(`finish_model`), distillation checks its teacher (`check_inputs`), loads it
(`before_data`), feeds its logits with the data (`train_features`) and supplies another
trainable (`make_trainable`), export runs after the model is saved (`after_finish`);
any of them can add callbacks and report lines. `train` returns a `RunResult`.

Run directory:
    config.yaml     the resolved config (reloadable)
    vocab.txt       the WordPiece vocabulary learned on the training split
    metrics.jsonl   one line per epoch, then one per evaluated split
    logs/           TensorBoard
    checkpoints/    resumable checkpoints (every `checkpoint_every` updates and epoch)
    model.keras     the final model (the best epoch's weights by default)
    report.md       results, setup and curves.png
    run.json        the run's status: "running" (resumable) or "finished"

Nothing is written before the config, the data, the model build and the run
directory's state are checked (`rundir.plan_run_dir`): bad input leaves an existing directory as it was, a
finished run is replaced only with `overwrite`, and an unfinished one is resumed from
its newest good checkpoint.
"""

import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

from tf_effitrain.config import ConfigError, load_config, save_config
from tf_effitrain.data.sources import load_examples
from tf_effitrain.errors import (
    DataError,
    DataWarning,
    NonFiniteError,
    RunDirError,
    TrainingInterrupted,
)
from tf_effitrain.training.rundir import (
    RESUME_MODES,
    clear_run_artifacts,
    lock_run_dir,
    plan_run_dir,
    run_status,
    write_run_state,
)

__all__ = ["train", "evaluate_run", "precision_policy", "config_plugins", "RunResult",
           "RunContext", "TrainerPlugin", "MODEL_FILE", "CONFIG_FILE"]

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"
_METRICS_FILE = "metrics.jsonl"  # == callbacks.METRICS_FILE (not imported: no TF here)
_VOCAB_FILE = "vocab.txt"  # == data.pipeline.VOCAB_FILE


@dataclasses.dataclass
class RunResult:
    """What a `train` run produced.

    Args:
        run_dir: str. The run directory (on non-chief workers: the chief's).
        chief: bool. Whether this process wrote the run directory.
        test: dict or None. Test-split metrics of the saved model (None without a test
            split).
        majority_baseline: float or None. Test accuracy of always predicting the most
            frequent training class.
        params: dict. `trainable` and `total` parameter counts.
        wall_time_s: float. Seconds from the call to the report.
        train_batches: int. Optimizer updates per epoch.
        epochs_run: int. Epochs trained (fewer than configured after early stopping).
        best_epoch: int or None. The epoch whose weights were kept (None: the last).
        precision: str. The dtype policy used.
        strategy: str. The strategy's name and replica count.
        replicas: int. Replicas in sync.
        model_path, metrics_path, report_path: str or None. Files written (None on
            non-chief workers).
    """

    run_dir: str
    chief: bool
    test: Optional[Dict[str, float]]
    majority_baseline: Optional[float]
    params: Dict[str, int]
    wall_time_s: float
    train_batches: int
    epochs_run: int
    best_epoch: Optional[int]
    precision: str
    strategy: str
    replicas: int
    model_path: Optional[str]
    metrics_path: Optional[str]
    report_path: Optional[str]


@dataclasses.dataclass
class RunContext:
    """The state one run's stages share; plugins read and extend it.

    Filled stage by stage: `mode` ("fresh" or "resume") at the input check;
    `strategy`, `write_dir` and `chief`; then `examples`, `keras`, `policy`, `data`
    (the vocabulary is prepared in `vocab_dir`, a staging directory, and moves into the
    run directory once the data and the model are checked); then `model` (and, with
    `batching: pack`, `packed`: its packed twin, which `fit` trains), `optimizer`,
    `trainable`, `callbacks`; then `history`, `test` (with `test_details`: per-class
    figures and the confusion matrix), `best_epoch`. `report_lines`
    collects Markdown lines plugins add to report.md.
    """

    config: Any
    run_dir: str
    log: Any
    start: float
    plugins: List[Any] = dataclasses.field(default_factory=list)
    mode: str = "fresh"
    resume: str = "auto"
    overwrite: bool = False
    vocab_dir: Optional[str] = None
    previous: str = "new"
    lock: Any = None
    resumed_from: Any = None
    checkpoint: Any = None
    strategy: Any = None
    write_dir: Optional[str] = None
    chief: bool = True
    examples: Any = None
    keras: Any = None
    policy: Optional[str] = None
    policy_reason: Optional[str] = None
    data: Any = None
    model: Any = None
    packed: Any = None
    params: Optional[Dict[str, int]] = None
    optimizer: Any = None
    trainable: Any = None
    callbacks: List[Any] = dataclasses.field(default_factory=list)
    history: Any = None
    epochs_run: int = 0
    best_epoch: Optional[int] = None
    test: Optional[Dict[str, float]] = None
    test_details: Optional[Dict[str, Any]] = None
    model_path: Optional[str] = None
    report_lines: List[str] = dataclasses.field(default_factory=list)


class TrainerPlugin:
    """Hooks a method into the run's stages; every hook defaults to doing nothing.

    Example:

    ```python
    class LogParams(et.TrainerPlugin):
        def after_finish(self, ctx):
            ctx.log(f"saved {ctx.model_path} ({ctx.params['trainable']:,} parameters)")

    et.train(config, plugins=[LogParams()])
    ```
    """

    def check_inputs(self, ctx):
        """Called first, before any TensorFlow work: raise on bad input here."""

    def before_data(self, ctx):
        """Called once the engine and precision are set, before the data is prepared
        (e.g. to load a teacher and put its vocabulary into `ctx.vocab_dir`). The run
        directory is not written yet."""

    def train_features(self, ctx):
        """Returns a callable adding per-example training inputs (see
        `prepare_data(train_features=...)`), or None."""
        return None

    def transform_model(self, ctx, model):
        """Called in `strategy.scope()` after the model is built; returns the model to
        train (e.g. wrapped for pruning)."""
        return model

    def make_trainable(self, ctx, model):
        """Returns the Keras model `fit` trains (e.g. a Distiller), or None for the
        default gradient accumulator."""
        return None

    def callbacks(self, ctx):
        """Extra callbacks for `fit`, run after the checkpoint callback (their state is
        not in the checkpoints; `ctx.resumed_from` says whether the run resumed)."""
        return []

    def finish_model(self, ctx, model):
        """Called after training; returns the model to evaluate and save (e.g. with its
        wrappers stripped)."""
        return model

    def after_finish(self, ctx):
        """Called after the model is saved (e.g. to export it)."""


@contextlib.contextmanager
def precision_policy(keras, policy):
    """Sets the engine's global dtype policy, restoring the previous one on exit."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _compile_for_classification(model, keras, optimizer=None, jit_compile=False,
                                steps_per_execution=1, packed=False, num_classes=None):
    """Sparse cross-entropy on logits, accuracy and macro-F1; `packed`: the model takes
    packed batches, whose sample weights mark the real slots (the metrics count each
    real example once). `num_classes` defaults to the model's output width."""
    from tf_effitrain.training.metrics import macro_f1

    if num_classes is None:
        num_classes = int(model.outputs[0].shape[-1])
    f1 = macro_f1(num_classes, keras)
    if packed:
        from tf_effitrain.data.packing import packed_accuracy

        metrics = {"weighted_metrics": [packed_accuracy(keras, name="accuracy"), f1]}
    else:
        metrics = {"metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy"), f1]}
    model.compile(
        optimizer=optimizer or "adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
        **metrics,
    )


def _confusion_of(model):
    """The confusion matrix its last `evaluate` accumulated in the compiled macro-F1
    (summed over replicas), or None."""
    import numpy as np

    seen, stack = set(), list(model.metrics)
    while stack:
        metric = stack.pop()
        if id(metric) in seen:
            continue
        seen.add(id(metric))
        if hasattr(metric, "confusion") and hasattr(metric, "num_classes"):
            return np.rint(np.asarray(metric.confusion)).astype(np.int64)
        stack.extend(getattr(metric, "metrics", None) or [])
    return None


def _log(verbose, message):
    if verbose:
        print(message, flush=True)


# Resuming and damaged checkpoints are said whatever `training.verbose` is.
_say = functools.partial(_log, 1)


def _shard_by_data(ds):
    """In-memory examples: every worker reads them all and keeps its part of each batch."""
    import tensorflow as tf

    if ds is None:
        return None
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _per_worker(ctx):
    """Whether each worker builds its own training pipeline: streamed data under
    MultiWorker."""
    from tf_effitrain.runtime.distribute import is_multi_worker

    return ctx.data.train_fn is not None and is_multi_worker(ctx.strategy)


def _stream_layout(ctx):
    """What a checkpoint's input position depends on: the global batch; for streamed
    data also the input pipelines (each worker's stream is its own files); and for
    per-worker streams the replicas (how a worker's stream is cut into batches)."""
    replicas = ctx.strategy.num_replicas_in_sync
    layout = {"global_batch": ctx.config.data.batch_size
              * ctx.config.training.accumulation_steps * replicas}
    if ctx.config.data.stream:
        layout["input_pipelines"] = 1
        if _per_worker(ctx):
            # The default strategy has no `worker_devices`: asked of MultiWorker only.
            local = len(ctx.strategy.extended.worker_devices)
            layout.update(input_pipelines=replicas // local, replicas=replicas)
    return layout


def _per_worker_stream(ctx, checkpointing):
    """Streamed training data under MultiWorker: each worker builds its own pipeline
    (`distribute_datasets_from_function`) and reads only its own files when there are
    at least as many as workers (`AutoShardPolicy.FILE`: no worker reads another's
    files), else every n-th example. Each pipeline resumes at its own position."""
    from tf_effitrain.data.stream import pipeline_files

    files = ctx.examples.files_of("train")

    def dataset_fn(context):
        mine, by_file = pipeline_files(files, context)
        num = context.num_input_pipelines
        if by_file and len(files) % num:
            warnings.warn(
                f"{len(files)} training files do not divide evenly among {num} workers:"
                " the workers with fewer files go round them more often, and their "
                f"examples weigh more. Use a multiple of {num} files of similar sizes.",
                DataWarning, stacklevel=2)
        if by_file:
            names = ", ".join(os.path.basename(p) for p in mine[:4])
            where = (f"reads {len(mine)} of {len(files)} training files: {names}"
                     + (", ..." if len(mine) > 4 else ""))
        else:
            where = (f"keeps 1 in {num} training examples of "
                     + (f"{len(files)} file(s) (fewer files than workers)" if files
                        else "the source"))
        ctx.log(f"data: input pipeline {context.input_pipeline_id} of {num} {where}")
        # Each update takes one batch per local replica from this worker's pipeline.
        local = context.num_replicas_in_sync // num
        return checkpointing.dataset(ctx.data.train_fn(context).repeat(),
                                     batches_per_update=local)

    return ctx.strategy.distribute_datasets_from_function(dataset_fn)


# ---- stages ------------------------------------------------------------------------------

def check_inputs(ctx):
    """Everything that can fail on bad input and needs no TensorFlow, before any work.

    The run directory must be creatable; JSONL/CSV/text-directory examples are read and
    checked here (tfds needs TensorFlow, so it is read in the data stage).
    """
    run_dir = ctx.run_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(
            f"The run directory {run_dir!r} is a file. Choose another "
            "`training.run_dir` (or `--run-dir`), or move the file away.")
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = run_dir if os.path.isdir(run_dir) else parent
    if not os.path.isdir(target) or not os.access(target, os.W_OK | os.X_OK):
        raise RunDirError(
            f"Cannot write the run directory {run_dir!r}: {target!r} is not a writable "
            "directory. Choose another `training.run_dir`.")
    if ctx.config.data.stream:
        # One pass that checks every label and counts; the corpus stays on disk.
        from tf_effitrain.data.stream import scan

        ctx.examples = scan(ctx.config.data, ctx.config.runtime.seed, log=ctx.log)
    elif ctx.config.data.source != "tfds":
        ctx.examples = load_examples(ctx.config.data)
    for plugin in ctx.plugins:
        plugin.check_inputs(ctx)
    ctx.previous = run_status(run_dir)
    ctx.mode = plan_run_dir(run_dir, ctx.config, ctx.resume, ctx.overwrite)


def stage_strategy(ctx, strategy=None):
    """The distribution strategy, first of all TensorFlow work (MultiWorker and TPU
    initialisation require it), and who writes the run directory."""
    from tf_effitrain.runtime.distribute import (
        cluster_spec,
        is_chief,
        is_multi_worker,
        resolve_strategy,
    )

    runtime = ctx.config.runtime
    ctx.strategy = strategy or resolve_strategy(runtime.strategy, runtime.tpu_address,
                                                log=ctx.log)
    ctx.chief = is_chief(cluster_spec()) if is_multi_worker(ctx.strategy) else True
    ctx.write_dir = ctx.run_dir if ctx.chief else tempfile.mkdtemp(
        prefix="tf_effitrain_worker_")


def _reusable_vocab(run_dir, config, mode):
    """The run directory's vocabulary, if this run may use it: always when resuming;
    for a fresh run only if the previous run used the same data settings and seed
    (otherwise it would disagree with `data.vocab_size` and friends, or have been
    learned on examples that are now in the test split)."""
    vocab = os.path.join(run_dir, _VOCAB_FILE)
    if not os.path.isfile(vocab):
        return None
    if mode == "resume":
        return vocab
    previous = os.path.join(run_dir, CONFIG_FILE)
    try:
        before = load_config(previous) if os.path.isfile(previous) else None
    except ConfigError:
        return None
    same = before is not None and (before.data, before.runtime.seed) == (
        config.data, config.runtime.seed)
    return vocab if same else None


def _commit_run_dir(ctx):
    """Writes the run directory once the inputs, the data and the model are checked: a
    fresh run replaces the previous run's artifacts; a resumed one keeps them. The
    chief holds the directory's lock until the run ends."""
    run_dir, config = ctx.write_dir, ctx.config
    os.makedirs(run_dir, exist_ok=True)
    if ctx.chief:
        ctx.lock = lock_run_dir(run_dir)
        # A directory without a run keeps whatever else it holds.
        if ctx.mode == "fresh" and ctx.previous != "new":
            _say(f"run directory: replacing the {ctx.previous} run in {run_dir}")
            clear_run_artifacts(run_dir)
    staged = os.path.join(ctx.vocab_dir, _VOCAB_FILE)
    if os.path.isfile(staged):
        shutil.copyfile(staged, os.path.join(run_dir, _VOCAB_FILE))
    shutil.rmtree(ctx.vocab_dir, ignore_errors=True)
    save_config(config, os.path.join(run_dir, CONFIG_FILE))
    if ctx.chief:
        write_run_state(run_dir, "running", mode=ctx.mode)


def _merged(feature_fns):
    """One `train_features` callable from several plugins' (None if there are none)."""
    if not feature_fns:
        return None

    def merged(ds):
        out = {}
        for fn in feature_fns:
            out.update(fn(ds))
        return out

    return merged


def stage_data(ctx):
    """Engine, seed, precision, and the batched splits (global batch = per-replica batch
    x replicas x accumulation steps)."""
    from tf_effitrain.data import prepare_data
    from tf_effitrain.engine import get_keras
    from tf_effitrain.runtime.distribute import is_tpu
    from tf_effitrain.runtime.precision import resolve_precision

    config = ctx.config
    if ctx.examples is None and not config.data.stream:
        ctx.examples = load_examples(config.data)
    ctx.vocab_dir = tempfile.mkdtemp(prefix="tf_effitrain_vocab_")
    reuse = _reusable_vocab(ctx.run_dir, config, ctx.mode)
    if reuse:
        with open(reuse, encoding="utf-8", errors="replace") as f:
            size = sum(1 for line in f if line.strip())
        if size > config.data.vocab_size:
            raise DataError(
                f"{reuse} holds {size} tokens but `data.vocab_size` is "
                f"{config.data.vocab_size}: the saved vocabulary is not this config's. "
                "Pass `--overwrite` to learn it again, or fix `data.vocab_size`.")
        shutil.copyfile(reuse, os.path.join(ctx.vocab_dir, _VOCAB_FILE))
    ctx.keras = get_keras(config.runtime.engine)
    ctx.keras.utils.set_random_seed(config.runtime.seed)
    ctx.policy, ctx.policy_reason = resolve_precision(config.runtime.precision, ctx.strategy,
                                                      config.model)
    ctx.log(f"precision: {ctx.policy} ({ctx.policy_reason})")
    for plugin in ctx.plugins:
        plugin.before_data(ctx)
    features = [f for f in (plugin.train_features(ctx) for plugin in ctx.plugins) if f]
    steps = config.training.accumulation_steps
    replicas = ctx.strategy.num_replicas_in_sync
    per_replica = config.data.batch_size
    model_cfg = config.model
    ctx.data = prepare_data(config.data, config.runtime.seed, ctx.vocab_dir,
                            train_batch_size=per_replica * replicas * steps,
                            eval_batch_size=per_replica * replicas, examples=ctx.examples,
                            train_features=_merged(features),
                            train_batch_multiple=replicas * steps,
                            eval_batch_multiple=replicas,
                            # Block-sparse blocks must start where a packed example does.
                            pack_align=model_cfg.block_size
                            if model_cfg.attention == "block_sparse" else 1, log=ctx.log)
    ctx.log(f"data: {ctx.data.split_sizes} examples, {len(ctx.data.class_names)} classes, "
            f"vocabulary {len(ctx.data.vocab)}, {ctx.data.train_batches} updates/epoch of "
            f"{per_replica * replicas * steps} examples ({replicas} replica(s) x {steps} "
            f"micro-batch(es) x {per_replica})")
    if ctx.data.packing:
        train = ctx.data.packing["train"]
        line = (f"{train['examples']} training examples in {train['rows']} rows of "
                f"{config.data.max_length} tokens, {train['real_fraction']:.1%} of "
                f"computed tokens real; {train['batch_rows']} rows per update"
                + (" (estimated from a sample)" if train.get("estimated") else ""))
        ctx.log(f"packing: {line}")
        ctx.report_lines.append(f"Packing: {line}.")
    if ctx.data.class_weights is not None:
        line = ", ".join(f"{name} {w:.3g}" for name, w in
                         zip(ctx.data.class_names, ctx.data.class_weights))
        ctx.log(f"class weights (balanced): {line}")
        ctx.report_lines.append(f"Class weights (balanced, training loss): {line}.")
    if is_tpu(ctx.strategy):
        from tf_effitrain.runtime.tpu_check import check_tpu_readiness

        problems = check_tpu_readiness(config, ctx.data.train)
        if problems:
            raise ConfigError("Not ready for TPUStrategy: " + " | ".join(problems))


@contextlib.contextmanager
def _checkpointable_dropout(keras, deterministic):
    """tf_keras layers built here draw dropout from `tf.random.Generator` states (saved
    in checkpoints) instead of stateful legacy ops, whose position a checkpoint cannot
    hold. Keras 3 seed generators are variables already."""
    from tf_effitrain.engine import engine_name

    if not deterministic or engine_name(keras) != "tf_keras":
        yield
        return
    experimental = keras.backend.experimental
    was = experimental.is_tf_random_generator_enabled()
    experimental.enable_tf_random_generator()
    try:
        yield
    finally:
        if not was:
            experimental.disable_tf_random_generator()


def stage_model(ctx):
    """The model (then each plugin's `transform_model`) and the optimizer, in scope."""
    from tf_effitrain.models import build_transformer_classifier, count_params
    from tf_effitrain.optim import build_optimizer

    config = ctx.config
    with ctx.strategy.scope(), precision_policy(ctx.keras, ctx.policy), \
            _checkpointable_dropout(ctx.keras, config.runtime.deterministic):
        packing = config.data.batching == "pack"
        model = build_transformer_classifier(
            config.model, len(ctx.data.vocab), len(ctx.data.class_names),
            config.data.max_length, keras=ctx.keras,
            max_segments=config.data.segments_per_row if packing else None)
        if packing:
            # `fit` trains the packed twin; the plain model (same weights) is saved.
            model, ctx.packed = model
        for plugin in ctx.plugins:
            transformed = plugin.transform_model(ctx, model)
            if packing and transformed is not model:
                raise ConfigError(
                    f"`data.batching: pack` cannot be combined with {type(plugin).__name__}:"
                    " it replaces the model, and the packed twin would not follow. Use "
                    "`data.batching: bucket`.")
            model = transformed
        ctx.model = model
        ctx.params = count_params(model)
        ctx.log(f"model: {ctx.params['trainable']:,} trainable parameters "
                f"({config.runtime.engine}, {ctx.policy})")
        steps_per_epoch = config.training.steps_per_epoch or ctx.data.train_batches
        ctx.optimizer = build_optimizer(config.optimizer, config.schedule,
                                        steps_per_epoch * config.training.epochs, ctx.keras)
    _commit_run_dir(ctx)


def stage_trainable(ctx):
    """What `fit` trains: a plugin's trainable, else the gradient accumulator (k=1 unless
    configured), compiled in scope.

    Always the accumulating train_step: one update rule under every strategy (dense
    gradients; Keras' Adam updates IndexedSlices embedding gradients row by row), and the
    fixes Keras 3 needs under distribution (its symbolic build drops a batch and
    MEAN-reduces it across replicas, failing on uneven last batches and on
    multi-worker). The plain model is what gets saved.
    """
    from tf_effitrain.training.accumulation import accumulate

    training = ctx.config.training
    with ctx.strategy.scope(), precision_policy(ctx.keras, ctx.policy):
        trainable = None
        for plugin in ctx.plugins:
            trainable = trainable or plugin.make_trainable(ctx, ctx.model)
        if trainable is not None and ctx.packed is not None:
            raise ConfigError("`data.batching: pack` cannot be combined with a plugin that "
                              "trains its own model. Use `data.batching: bucket`.")
        ctx.trainable = trainable or accumulate(
            ctx.packed if ctx.packed is not None else ctx.model, training.accumulation_steps)
        _compile_for_classification(ctx.trainable, ctx.keras, ctx.optimizer,
                                    training.jit_compile, training.steps_per_execution,
                                    packed=ctx.packed is not None,
                                    num_classes=len(ctx.data.class_names))


def _after_restore(ctx, point, steps):
    """Cuts `metrics.jsonl` back to what the restored checkpoint had seen, or clears
    the unfinished run's records when no checkpoint was usable."""
    if not ctx.chief:
        return
    metrics = os.path.join(ctx.write_dir, _METRICS_FILE)
    if point is None:
        _say("resume: no usable checkpoint in the unfinished run: training starts "
             "from the first update")
        clear_run_artifacts(ctx.write_dir, names=(_METRICS_FILE, "logs"))
        return
    if os.path.exists(metrics):
        with open(metrics, "r+b") as f:  # epochs after the checkpoint are trained again
            f.truncate(int(point.state.get("metrics_bytes", 0)))
    where = (f"epoch {point.epoch + 1}, batch {point.batch_in_epoch}/{steps}"
             if point.batch_in_epoch else f"end of epoch {point.epoch}")
    _say(f"resume: from update {point.updates} ({where}) of "
         f"{os.path.basename(point.path)}")


def stage_fit(ctx):
    """`fit` with the default callbacks (metrics, TensorBoard, best weights, early
    stopping), resumable checkpoints, and the plugins' callbacks; resumed runs continue
    at the checkpoint's update and input position."""
    from tf_effitrain.runtime.distribute import is_multi_worker
    from tf_effitrain.training.callbacks import best_weights_class, default_callbacks
    from tf_effitrain.training.checkpoint import CHECKPOINT_DIR, Checkpointing
    from tf_effitrain.training.signals import stop_on_signals

    training = ctx.config.training
    steps = training.steps_per_epoch or ctx.data.train_batches
    keep_best = training.keep_best and ctx.data.validation is not None
    if training.keep_best and not keep_best:
        ctx.log("best weights: no validation split, the last epoch's weights are kept")
    callbacks = default_callbacks(
        ctx.keras, ctx.write_dir, training.early_stopping_patience if
        ctx.data.validation is not None else None, training.best_metric, keep_best,
        epoch_weights=False)
    best = next((c for c in callbacks if isinstance(c, best_weights_class(ctx.keras))), None)
    stopper = next((c for c in callbacks
                    if isinstance(c, ctx.keras.callbacks.EarlyStopping)), None)
    every = training.checkpoint_every if training.steps_per_execution == 1 else None
    with precision_policy(ctx.keras, ctx.policy):
        checkpointing = Checkpointing(
            ctx.trainable, os.path.join(ctx.write_dir, CHECKPOINT_DIR), steps, every=every,
            keep=training.keep_checkpoints, restore=ctx.mode == "resume",
            write=ctx.chief, read_directory=os.path.join(ctx.run_dir, CHECKPOINT_DIR),
            log=_say, metrics_path=os.path.join(ctx.write_dir, _METRICS_FILE),
            best_weights=best, early_stopping=stopper, nonfinite=training.nonfinite,
            # The input position means the same only for the same global batch (and,
            # for per-worker streams, the same workers and replicas).
            expect=_stream_layout(ctx))
    point = ctx.resumed_from = checkpointing.point
    if ctx.mode == "resume":
        _after_restore(ctx, point, steps)
    ctx.checkpoint = checkpointing.callback
    ctx.callbacks = checkpointing.callbacks(callbacks)
    for plugin in ctx.plugins:
        ctx.callbacks += plugin.callbacks(ctx)
    # Repeat the batched pipeline: each repetition is one full pass (buckets flush at
    # its end), so `steps_per_epoch = train_batches` is exactly one epoch (one pass per
    # worker, approximately, for per-worker streams). The stream is a function of the
    # seed alone, so a resumed run skips to where it stopped.
    if _per_worker(ctx):
        train = _per_worker_stream(ctx, checkpointing)
    else:
        train = _shard_by_data(checkpointing.dataset(ctx.data.train.repeat()))
    # Under MultiWorker a signal reaches one worker only: stopping it alone would hang
    # the others' collectives (tf.distribute's PreemptionCheckpointHandler is for that).
    signals = (contextlib.nullcontext() if is_multi_worker(ctx.strategy)
               else stop_on_signals(ctx.checkpoint.request_stop))
    start = time.perf_counter()
    with precision_policy(ctx.keras, ctx.policy), signals:
        ctx.history = ctx.trainable.fit(
            train,
            validation_data=_shard_by_data(ctx.data.validation),
            epochs=training.epochs,
            # Stopped early before the kill: nothing left to train (the callbacks still
            # restore the best weights).
            initial_epoch=training.epochs if checkpointing.stopped
            else checkpointing.initial_epoch,
            steps_per_epoch=steps,
            callbacks=ctx.callbacks,
            verbose=training.verbose,
            shuffle=False,  # The pipeline shuffles; fit cannot shuffle a dataset.
        )
    fit_seconds = time.perf_counter() - start
    _check_stop(ctx)
    cp = ctx.checkpoint
    if cp.saves:
        share = cp.seconds / max(fit_seconds, 1e-9)
        ctx.log(f"checkpoints: {cp.saves} written in {cp.seconds:.2f} s "
                f"({share:.1%} of training)")
        ctx.report_lines.append(
            f"Checkpoints: {cp.saves} written in {cp.seconds:.2f} s ({share:.1%} of "
            f"{fit_seconds:.1f} s training), "
            + (f"every {every} updates and at epoch ends" if every else "at epoch ends")
            + (f"; resumed from update {point.updates}" if point is not None else "") + ".")
    ctx.epochs_run = (point.epoch if point is not None else 0) + len(ctx.history.epoch)
    if best is not None and best.best_epoch is not None:
        ctx.best_epoch = best.best_epoch
        ctx.log(f"best weights: epoch {best.best_epoch} of {ctx.epochs_run} "
                f"({best.monitor} {best.best:.4f})")


def _check_stop(ctx):
    """Raises when `fit` stopped on a non-finite value or a signal."""
    cp = ctx.checkpoint
    if cp.stop_reason is None:
        return
    last = (f"the last good checkpoint is {os.path.relpath(cp.last_path, ctx.run_dir)}"
            if cp.last_path else "no checkpoint was written before it")
    if cp.stop_reason == "nonfinite":
        raise NonFiniteError(
            f"The loss became NaN/Inf at update {cp.nonfinite_update} (epoch "
            f"{cp.epoch + 1}); training stopped and {last}. Lower "
            "`optimizer.learning_rate` or set `optimizer.global_clipnorm`, and train "
            "again with `--overwrite` (or `training.nonfinite: warn` to go on).")
    saved = (f"checkpoint {os.path.relpath(cp.last_path, ctx.run_dir)} (update "
             f"{cp.last_updates})" if cp.last_path else "no checkpoint")
    raise TrainingInterrupted(
        f"Interrupted by {cp.stop_reason}: {saved} in {ctx.run_dir!r}. Run the same "
        "command again (without `--overwrite`) to resume from it.")


def stage_finish(ctx):
    """Plugins' `finish_model`, the test evaluation, `model.keras`, `after_finish`."""
    from tf_effitrain.training.callbacks import append_jsonl

    model = ctx.model
    for plugin in ctx.plugins:
        model = plugin.finish_model(ctx, model)
    if model is not ctx.model:  # e.g. wrappers stripped: count what is saved
        from tf_effitrain.models import count_params

        ctx.params = count_params(model)
    ctx.model = model
    metrics_path = os.path.join(ctx.write_dir, _METRICS_FILE)
    with precision_policy(ctx.keras, ctx.policy):
        ctx.model_path = os.path.join(ctx.write_dir, MODEL_FILE)
        model.save(ctx.model_path)
        if ctx.data.test is not None:
            evaluated, split = ctx.trainable, ctx.data.test
            if ctx.packed is not None:
                # The figures of the saved model (one text per row, compiled after it
                # was saved), so that `tf-effitrain evaluate` and exports agree with them
                # under mixed precision too.
                with ctx.strategy.scope():
                    _compile_for_classification(model, ctx.keras)
                evaluated, split = model, ctx.data.plain_test
            test = evaluated.evaluate(_shard_by_data(split), return_dict=True, verbose=0)
            ctx.test = {name: float(v) for name, v in test.items()}
            ctx.test_details = _details(evaluated, ctx.data.class_names)
            append_jsonl(metrics_path, {"split": "test", **ctx.test,
                                        "majority_baseline": ctx.data.majority_baseline,
                                        "epoch": ctx.best_epoch or ctx.epochs_run,
                                        **(ctx.test_details or {})})
    from tf_effitrain.export.predict import write_tokenizer_settings

    # `tf-effitrain predict RUN/model.keras "text"` tokenizes exactly as training did.
    write_tokenizer_settings(ctx.write_dir, ctx.data.vocab, ctx.config.data,
                             ctx.data.class_names)
    for plugin in ctx.plugins:
        plugin.after_finish(ctx)


def _details(evaluated, class_names):
    """Per-class precision / recall / F1 and the confusion matrix of the evaluation just
    run (`training.metrics.classification_metrics`, without the figures `evaluate`
    already gave), or None if the model was compiled without the macro-F1 metric."""
    from tf_effitrain.training.metrics import classification_metrics

    confusion = _confusion_of(evaluated)
    if confusion is None:
        return None
    details = classification_metrics(confusion, class_names)
    return {"per_class": details["per_class"], "confusion": details["confusion"],
            "weighted_f1": details["weighted_f1"]}


def stage_report(ctx):
    """report.md and curves.png; the `RunResult`."""
    from tf_effitrain.runtime.distribute import strategy_name
    from tf_effitrain.training.report import write_report

    wall = time.time() - ctx.start
    label = strategy_name(ctx.strategy)
    summary = {
        "config": ctx.config.to_dict(),
        "params": ctx.params,
        "split_sizes": ctx.data.split_sizes,
        "class_names": ctx.data.class_names,
        "majority_baseline": ctx.data.majority_baseline,
        "test": ctx.test,
        "test_details": ctx.test_details,
        "wall_time_s": wall,
        "precision": f"{ctx.policy} ({ctx.policy_reason})",
        "strategy": label,
        "best_epoch": ctx.best_epoch,
        "epochs_run": ctx.epochs_run,
        "extra_lines": ctx.report_lines,
    }
    report = write_report(ctx.write_dir, summary)
    written = ctx.chief
    if written:
        write_run_state(ctx.write_dir, "finished", wall_time_s=round(wall, 3))
    return RunResult(
        run_dir=ctx.run_dir, chief=ctx.chief, test=ctx.test,
        majority_baseline=ctx.data.majority_baseline, params=ctx.params,
        wall_time_s=wall, train_batches=ctx.data.train_batches, epochs_run=ctx.epochs_run,
        best_epoch=ctx.best_epoch, precision=ctx.policy, strategy=label,
        replicas=ctx.strategy.num_replicas_in_sync,
        model_path=ctx.model_path if written else None,
        metrics_path=os.path.join(ctx.run_dir, _METRICS_FILE) if written else None,
        report_path=report if written else None)


def config_plugins(config):
    """The plugins the config's own sections ask for (e.g. `export:`), in stage order."""
    plugins = []
    if config.distillation.teacher:
        from tf_effitrain.distill.plugin import DistillationPlugin

        plugins.append(DistillationPlugin(config.distillation))
    if config.export.quantize or "saved_model" in config.export.formats:
        from tf_effitrain.export.plugin import ExportPlugin

        plugins.append(ExportPlugin(config.export))
    if config.compression.enabled:
        from tf_effitrain.compress.run import CompressionPlugin

        plugins.append(CompressionPlugin(config))
    return plugins


def train(config, run_dir=None, strategy=None, plugins=(), resume="auto",
          overwrite=False):
    """Trains, evaluates and reports one experiment.

    Under MultiWorkerMirroredStrategy every worker runs this; only the chief writes
    the run directory (the others write to a temporary directory, then delete it).

    Args:
        config: `ExperimentConfig`.
        run_dir: str or None. Overrides `config.training.run_dir`.
        strategy: `tf.distribute.Strategy` or None. None resolves
            `config.runtime.strategy` (`auto` by default).
        plugins: sequence of `TrainerPlugin`. Hooks into the stages (see the module
            docstring); the config's own sections add theirs after these
            (`config_plugins`).
        resume: str. `"auto"`: an unfinished run of the same config in the run
            directory is resumed from its newest good checkpoint; `"never"`: it is
            not (and is replaced only with `overwrite`).
        overwrite: bool. Replace a run (finished or not) in the run directory.

    Returns:
        A `RunResult`.

    Example:

    ```python
    config = et.load_config("configs/demo_cpu.yaml", ["training.epochs=3"])
    result = et.train(config)
    print(result.test["accuracy"], result.best_epoch, result.model_path)
    ```
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"`resume` must be one of {RESUME_MODES}. Received: resume={resume!r}")
    ctx = RunContext(config=config, run_dir=run_dir or config.training.run_dir,
                     log=functools.partial(_log, config.training.verbose),
                     start=time.time(), plugins=list(plugins) + config_plugins(config),
                     resume=resume, overwrite=overwrite)
    check_inputs(ctx)
    stage_strategy(ctx, strategy)
    try:
        with _determinism_scope(config.runtime.deterministic), \
                _streamed_ends(config.data.stream):
            stage_data(ctx)
            stage_model(ctx)
            stage_trainable(ctx)
            stage_fit(ctx)
            stage_finish(ctx)
            return stage_report(ctx)
    finally:
        if ctx.lock is not None:
            ctx.lock.close()
        if ctx.vocab_dir:
            shutil.rmtree(ctx.vocab_dir, ignore_errors=True)
        if not ctx.chief:
            shutil.rmtree(ctx.write_dir, ignore_errors=True)


@contextlib.contextmanager
def _streamed_ends(enabled):
    """Streamed validation and test splits have no declared length: Keras learns it
    when the first pass runs out, and warns that training was interrupted. It was not
    (the training stream repeats): that warning is dropped for streamed runs."""
    with warnings.catch_warnings():
        if enabled:
            warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


@contextlib.contextmanager
def _determinism_scope(enabled):
    """Op determinism for one run (`runtime.deterministic`), off again afterwards."""
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    if enabled:
        tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not was:
            # Process-wide: later runs in this process get the default back.
            tf_config.disable_op_determinism()


def evaluate_run(run_dir, split="test"):
    """Re-evaluates a finished run's saved model on one of its (re-created) splits.

    The split is rebuilt from the run's `config.yaml` with its seed and cached
    vocabulary, so it holds the same examples the run was evaluated on.

    Returns:
        dict of metric name -> float.
    """
    config_path = os.path.join(run_dir, CONFIG_FILE)
    model_path = os.path.join(run_dir, MODEL_FILE)
    if run_status(run_dir) == "running":
        raise RunDirError(
            f"{run_dir!r} holds an unfinished run (training or its test evaluation did "
            "not complete). Finish it with the same `tf-effitrain train` command (it "
            "resumes), then evaluate.")
    for path in (config_path, model_path):
        if not os.path.isfile(path):
            raise RunDirError(
                f"{path!r} not found: is {run_dir!r} a finished `tf-effitrain train` run?")
    config = load_config(config_path)
    fraction = {"test": config.data.test_fraction,
                "validation": config.data.val_fraction}.get(split, 1.0)
    if not fraction and config.data.split_method != "files":
        key = "test_fraction" if split == "test" else "val_fraction"
        raise DataError(
            f"The run {run_dir!r} has no {split} split (`data.{key}: 0` in its "
            "config.yaml). Evaluate another split with `--split`.")
    from tf_effitrain.data.pipeline import prepare_data, unpacked
    from tf_effitrain.engine import get_keras
    from tf_effitrain.runtime.precision import resolve_precision
    from tf_effitrain.training.callbacks import append_jsonl

    keras = get_keras(config.runtime.engine)
    # No augmentation when measuring (token shuffle applies to the training split); the
    # saved model takes one example per row, so packed runs are evaluated unpacked.
    data_cfg = unpacked(dataclasses.replace(config.data, token_shuffle=0.0))
    data = prepare_data(data_cfg, config.runtime.seed, run_dir)
    ds = {"test": data.test, "validation": data.validation, "train": data.train}[split]
    if ds is None:
        raise DataError(f"The run {run_dir!r} has no examples in its {split} split.")
    policy, _ = resolve_precision(config.runtime.precision, model_cfg=config.model)
    with precision_policy(keras, policy), _streamed_ends(config.data.stream):
        model = keras.models.load_model(model_path, compile=False)
        _compile_for_classification(model, keras)
        result = model.evaluate(ds, return_dict=True, verbose=0)
    result = {k: float(v) for k, v in result.items()}
    details = _details(model, data.class_names)
    append_jsonl(os.path.join(run_dir, _METRICS_FILE), {"split": split, **result,
                                                        "evaluated_by": "evaluate",
                                                        **(details or {})})
    return result
