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
import os
import time

from tf_effitrain.config import load_config, save_config
from tf_effitrain.data import prepare_data
from tf_effitrain.engine import get_keras
from tf_effitrain.models import build_transformer_classifier, count_params, layers_for
from tf_effitrain.optim import build_optimizer, lamb_class, schedule_class
from tf_effitrain.training.accumulation import accumulate, accumulator_class
from tf_effitrain.training.callbacks import append_jsonl, default_callbacks
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


def _compile_for_classification(model, keras, optimizer=None, jit_compile=False):
    model.compile(
        optimizer=optimizer or "adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


def _log(verbose, message):
    if verbose:
        print(message, flush=True)


def train(config, run_dir=None):
    """Trains, evaluates and reports one experiment.

    Args:
        config: `ExperimentConfig`.
        run_dir: str or None. Overrides `config.training.run_dir`.

    Returns:
        dict: `run_dir`, `test` metrics, `majority_baseline`, `params`, `wall_time_s`,
        `train_batches` (batches per epoch), and the paths of the model, metrics and
        report.
    """
    start = time.time()
    run_dir = run_dir or config.training.run_dir
    verbose = config.training.verbose
    os.makedirs(run_dir, exist_ok=True)
    save_config(config, os.path.join(run_dir, CONFIG_FILE))
    keras = get_keras(config.runtime.engine)
    keras.utils.set_random_seed(config.runtime.seed)
    k = config.training.accumulation_steps
    # Everything that can fail on bad input happens before the first step.
    data = prepare_data(config.data, config.runtime.seed, run_dir,
                        train_batch_size=config.data.batch_size * k)
    _log(verbose, f"data: {data.split_sizes} examples, {len(data.class_names)} classes, "
                  f"vocabulary {len(data.vocab)}, {data.train_batches} updates/epoch of "
                  f"{config.data.batch_size * k} examples"
                  + (f" ({k} micro-batches of {config.data.batch_size})" if k > 1 else ""))
    with precision_policy(keras, config.runtime.precision):
        model = build_transformer_classifier(
            config.model, len(data.vocab), len(data.class_names), config.data.max_length,
            keras=keras)
        params = count_params(model)
        _log(verbose, f"model: {params['trainable']:,} trainable parameters "
                      f"({config.runtime.engine}, {config.runtime.precision})")
        steps_per_epoch = config.training.steps_per_epoch or data.train_batches
        total_updates = steps_per_epoch * config.training.epochs
        optimizer = build_optimizer(config.optimizer, config.schedule, total_updates, keras)
        # With accumulation, fit a wrapper whose train_step splits each batch; the
        # plain model is what gets saved.
        trainable = accumulate(model, k) if k > 1 else model
        _compile_for_classification(trainable, keras, optimizer, config.training.jit_compile)
        # Repeat the batched pipeline: each repetition is one full pass (buckets flush at
        # its end), so `steps_per_epoch = train_batches` is exactly one epoch.
        train_ds = data.train.repeat()
        trainable.fit(
            train_ds,
            validation_data=data.validation,
            epochs=config.training.epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=default_callbacks(keras, run_dir, config.training.early_stopping_patience),
            verbose=verbose,
            shuffle=False,  # The pipeline shuffles; fit cannot shuffle a dataset.
        )
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        test = None
        if data.test is not None:
            test = trainable.evaluate(data.test, return_dict=True, verbose=0)
            test = {k: float(v) for k, v in test.items()}
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
    }
    report = write_report(run_dir, summary)
    return {"run_dir": run_dir, "test": test, "majority_baseline": data.majority_baseline,
            "params": params, "wall_time_s": wall, "train_batches": data.train_batches,
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
    with precision_policy(keras, config.runtime.precision):
        model = keras.models.load_model(model_path, compile=False)
        _compile_for_classification(model, keras)
        result = model.evaluate(ds, return_dict=True, verbose=0)
    result = {k: float(v) for k, v in result.items()}
    append_jsonl(os.path.join(run_dir, "metrics.jsonl"), {"split": split, **result,
                                                          "evaluated_by": "evaluate"})
    return result
