"""The recipe behind `tf-effitrain train` and `evaluate`: config in, run directory out.

Run directory:
    config.yaml     the resolved config (reloadable)
    vocab.txt       the WordPiece vocabulary learned on the training split
    metrics.jsonl   one line per epoch, then one per evaluated split
    logs/           TensorBoard
    checkpoints/    weights after every epoch
    model.keras     the final model
    report.md       results, setup and curves.png
"""

import contextlib
import functools
import os
import shutil
import tempfile
import time

from tf_effitrain.config import ConfigError, load_config, save_config
from tf_effitrain.data import prepare_data
from tf_effitrain.data.pipeline import VOCAB_FILE
from tf_effitrain.engine import get_keras
from tf_effitrain.models import build_transformer_classifier, count_params, layers_for
from tf_effitrain.optim import build_optimizer, lamb_class, schedule_class
from tf_effitrain.runtime.precision import resolve_precision
from tf_effitrain.training.accumulation import accumulate, accumulator_class
from tf_effitrain.training.callbacks import METRICS_FILE, append_jsonl, default_callbacks
from tf_effitrain.training.report import write_report

__all__ = ["train", "evaluate_run", "precision_policy", "MODEL_FILE", "CONFIG_FILE"]

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"


@contextlib.contextmanager
def precision_policy(keras, policy):
    """Sets the engine's global dtype policy, restoring the previous one on exit."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _register_custom_objects(keras):
    # Defining the classes registers them for `load_model`.
    layers_for(keras)
    schedule_class(keras)
    lamb_class(keras)
    accumulator_class(keras)


def _compile_for_classification(model, keras, optimizer=None, jit_compile=False,
                                 steps_per_execution=1):
    model.compile(
        optimizer=optimizer or "adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


def _log(verbose, message):
    if verbose:
        print(message, flush=True)


def _shard_by_data(ds):
    """In-memory examples: every worker reads them all and keeps its part of each batch."""
    import tensorflow as tf

    if ds is None:
        return None
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def train(config, run_dir=None, strategy=None):
    """Trains, evaluates and reports one experiment.

    Under MultiWorkerMirroredStrategy every worker runs this; only the chief writes
    the run directory (the others write to a temporary directory, then delete it).

    Args:
        config: `ExperimentConfig`.
        run_dir: str or None. Overrides `config.training.run_dir`.
        strategy: `tf.distribute.Strategy` or None. None resolves
            `config.runtime.strategy` (`auto` by default).

    Returns:
        dict: `run_dir`, `test` metrics, `majority_baseline`, `params`, `wall_time_s`,
        `train_batches` (updates per epoch), `precision`, `strategy`, `replicas`,
        `chief`, and the paths of the model, metrics and report.
    """
    from tf_effitrain.runtime.distribute import (
        cluster_spec,
        is_chief,
        is_multi_worker,
        resolve_strategy,
    )

    start = time.time()
    verbose = config.training.verbose
    log = functools.partial(_log, verbose)
    # The strategy comes first: MultiWorkerMirroredStrategy and TPU initialisation must
    # happen before any other TensorFlow work in the process.
    if strategy is None:
        strategy = resolve_strategy(config.runtime.strategy, config.runtime.tpu_address,
                                    log=log)
    chief = is_chief(cluster_spec()) if is_multi_worker(strategy) else True
    run_dir = run_dir or config.training.run_dir
    write_dir = run_dir if chief else tempfile.mkdtemp(prefix="tf_effitrain_worker_")
    try:
        result = _train(config, strategy, write_dir, log, start)
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    result.update(run_dir=run_dir, chief=chief)
    if not chief:
        result.update(model_path=None, report_path=None, metrics_path=None)
    return result


def _fresh_run_dir(run_dir, config):
    """Prepares `run_dir` for a new run of `config`.

    A new run starts its own `metrics.jsonl` (runs do not resume yet). The cached
    vocabulary is kept only if the previous run in this directory used the same data
    settings; otherwise it would silently disagree with `data.vocab_size` and friends.
    """
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, METRICS_FILE)
    if os.path.exists(metrics):
        os.remove(metrics)
    previous = os.path.join(run_dir, CONFIG_FILE)
    vocab = os.path.join(run_dir, VOCAB_FILE)
    if os.path.exists(vocab):
        try:
            same_data = os.path.isfile(previous) and load_config(previous).data == config.data
        except ConfigError:
            same_data = False
        if not same_data:
            os.remove(vocab)
    save_config(config, previous)


def _train(config, strategy, run_dir, log, start):
    from tf_effitrain.runtime.distribute import is_tpu, strategy_name

    _fresh_run_dir(run_dir, config)
    strategy_label = strategy_name(strategy)
    keras = get_keras(config.runtime.engine)
    keras.utils.set_random_seed(config.runtime.seed)
    policy, reason = resolve_precision(config.runtime.precision, strategy)
    log(f"precision: {policy} ({reason})")
    k = config.training.accumulation_steps
    replicas = strategy.num_replicas_in_sync
    per_replica = config.data.batch_size
    # Everything that can fail on bad input happens before the first step.
    data = prepare_data(config.data, config.runtime.seed, run_dir,
                        train_batch_size=per_replica * replicas * k,
                        eval_batch_size=per_replica * replicas)
    log(f"data: {data.split_sizes} examples, {len(data.class_names)} classes, "
        f"vocabulary {len(data.vocab)}, {data.train_batches} updates/epoch of "
        f"{per_replica * replicas * k} examples ({replicas} replica(s) x {k} "
        f"micro-batch(es) x {per_replica})")
    if is_tpu(strategy):
        from tf_effitrain.runtime.tpu_check import check_tpu_readiness

        problems = check_tpu_readiness(config, data.train)
        if problems:
            raise ConfigError("Not ready for TPUStrategy:\n- " + "\n- ".join(problems))
    with strategy.scope(), precision_policy(keras, policy):
        model = build_transformer_classifier(
            config.model, len(data.vocab), len(data.class_names), config.data.max_length,
            keras=keras)
        params = count_params(model)
        log(f"model: {params['trainable']:,} trainable parameters "
            f"({config.runtime.engine}, {policy})")
        steps_per_epoch = config.training.steps_per_epoch or data.train_batches
        total_updates = steps_per_epoch * config.training.epochs
        optimizer = build_optimizer(config.optimizer, config.schedule, total_updates, keras)
        # Always the accumulating train_step (k=1 unless configured): one update rule
        # under every strategy (dense gradients; Keras' Adam updates IndexedSlices
        # embedding gradients row by row), and the fixes Keras 3 needs under
        # distribution (its symbolic build drops a batch and MEAN-reduces it across
        # replicas, failing on uneven last batches and on multi-worker). The plain
        # model is what gets saved.
        trainable = accumulate(model, k)
        _compile_for_classification(trainable, keras, optimizer,
                                    config.training.jit_compile,
                                    config.training.steps_per_execution)
    # Repeat the batched pipeline: each repetition is one full pass (buckets flush at
    # its end), so `steps_per_epoch = train_batches` is exactly one epoch.
    with precision_policy(keras, policy):
        trainable.fit(
            _shard_by_data(data.train.repeat()),
            validation_data=_shard_by_data(data.validation),
            epochs=config.training.epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=default_callbacks(keras, run_dir,
                                        config.training.early_stopping_patience),
            verbose=config.training.verbose,
            shuffle=False,  # The pipeline shuffles; fit cannot shuffle a dataset.
        )
        metrics_path = os.path.join(run_dir, METRICS_FILE)
        test = None
        if data.test is not None:
            test = trainable.evaluate(_shard_by_data(data.test), return_dict=True, verbose=0)
            test = {name: float(v) for name, v in test.items()}
            append_jsonl(metrics_path, {"split": "test", **test,
                                        "majority_baseline": data.majority_baseline})
        model_path = os.path.join(run_dir, MODEL_FILE)
        model.save(model_path)
    wall = time.time() - start
    summary = {
        "config": config.to_dict(),
        "params": params,
        "split_sizes": data.split_sizes,
        "class_names": data.class_names,
        "majority_baseline": data.majority_baseline,
        "test": test,
        "wall_time_s": wall,
        "precision": f"{policy} ({reason})",
        "strategy": strategy_label,
    }
    report = write_report(run_dir, summary)
    return {"test": test, "majority_baseline": data.majority_baseline,
            "params": params, "wall_time_s": wall, "train_batches": data.train_batches,
            "precision": policy, "strategy": strategy_label, "replicas": replicas,
            "model_path": model_path, "report_path": report, "metrics_path": metrics_path}


def evaluate_run(run_dir, split="test"):
    """Re-evaluates a finished run's saved model on one of its (re-created) splits.

    The split is rebuilt from the run's `config.yaml` with its seed and cached
    vocabulary, so it holds the same examples the run was evaluated on.
    """
    config_path = os.path.join(run_dir, CONFIG_FILE)
    model_path = os.path.join(run_dir, MODEL_FILE)
    for path in (config_path, model_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} not found: is {run_dir!r} a finished `tf-effitrain train` run?")
    config = load_config(config_path)
    keras = get_keras(config.runtime.engine)
    _register_custom_objects(keras)
    data = prepare_data(config.data, config.runtime.seed, run_dir)
    ds = {"test": data.test, "validation": data.validation, "train": data.train}[split]
    if ds is None:
        raise ValueError(f"The run has no {split!r} split (its fraction is 0).")
    policy, _ = resolve_precision(config.runtime.precision)
    with precision_policy(keras, policy):
        model = keras.models.load_model(model_path, compile=False)
        _compile_for_classification(model, keras)
        result = model.evaluate(ds, return_dict=True, verbose=0)
    result = {k: float(v) for k, v in result.items()}
    append_jsonl(os.path.join(run_dir, METRICS_FILE), {"split": split, **result,
                                                          "evaluated_by": "evaluate"})
    return result
