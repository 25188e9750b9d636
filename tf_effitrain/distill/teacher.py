"""The teacher side of distillation: a finished run as teacher, and its logits once.

`check_teacher_run` needs no TensorFlow (the command line calls it before anything
heavy); `load_teacher` and `teacher_logits` do.
"""

import dataclasses
import os
import time

from tf_effitrain.config import ConfigError, load_config
from tf_effitrain.errors import RunDirError

__all__ = ["SAME_DATA_KEYS", "check_teacher_run", "check_hidden_layers", "load_teacher",
           "saved_layer_names", "teacher_logits", "teacher_summary"]

_MODEL_FILE = "model.keras"  # == training.trainer.MODEL_FILE (no TF import here)
_CONFIG_FILE = "config.yaml"

# Data settings that decide the splits and the token ids: a student must share them
# with its teacher, or the teacher would have trained on the student's test examples,
# or read other token ids than the student.
SAME_DATA_KEYS = ("source", "path", "tfds_name", "tfds_split", "text_field",
                  "label_field", "classes", "val_fraction", "test_fraction",
                  "max_examples", "vocab_size", "lowercase")


def _same_path(a, b):
    # realpath: a symlink to the teacher's directory is the teacher's directory.
    return os.path.realpath(a) == os.path.realpath(b)


def check_teacher_run(teacher_dir, config, run_dir=None):
    """Checks that `teacher_dir` is a finished run the student of `config` can learn from.

    Args:
        teacher_dir: str. The teacher's run directory.
        config: `ExperimentConfig` of the student.
        run_dir: str or None. The student's run directory (default
            `config.training.run_dir`; `--run-dir` overrides it).

    Returns:
        The teacher's `ExperimentConfig`.

    Raises:
        RunDirError: the directory is not a finished run.
        ConfigError: the student's data settings or seed differ from the teacher's
            (names each key), or its `max_length` exceeds the teacher's.
    """
    for name in (_CONFIG_FILE, _MODEL_FILE, "vocab.txt"):
        if not os.path.isfile(os.path.join(teacher_dir, name)):
            raise RunDirError(
                f"`distillation.teacher`: {os.path.join(teacher_dir, name)!r} not found. "
                "Name the directory of a finished `tf-effitrain train` run (e.g. "
                "runs/demo after `make demo`).")
    teacher = load_config(os.path.join(teacher_dir, _CONFIG_FILE))
    if _same_path(teacher_dir, run_dir or config.training.run_dir):
        raise ConfigError(
            "The student's run directory is the teacher's: the student would overwrite "
            f"its teacher. Choose another `training.run_dir` / --run-dir. Received: "
            f"{run_dir or config.training.run_dir!r}")
    differ = []
    for key in SAME_DATA_KEYS:
        mine, theirs = getattr(config.data, key), getattr(teacher.data, key)
        same = _same_path(mine, theirs) if key == "path" and mine and theirs else mine == theirs
        if not same:
            differ.append(f"data.{key}={mine!r} (teacher: {theirs!r})")
    if config.runtime.seed != teacher.runtime.seed:
        differ.append(f"runtime.seed={config.runtime.seed} (teacher: {teacher.runtime.seed})")
    if differ:
        raise ConfigError(
            "The student must use the teacher run's data splits and vocabulary, but "
            + "; ".join(differ) + ". Set them as in " + os.path.join(teacher_dir, _CONFIG_FILE)
            + " (they decide which examples are held out for the test).")
    if config.data.max_length > teacher.data.max_length:
        raise ConfigError(
            f"`data.max_length` ({config.data.max_length}) exceeds the teacher's "
            f"({teacher.data.max_length}): the teacher has no positions beyond it. "
            f"Set data.max_length <= {teacher.data.max_length}.")
    return teacher


def saved_layer_names(path):
    """Layer names of a functional model saved as `.keras`, read without TensorFlow."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    return [layer.get("config", {}).get("name") or layer.get("name")
            for layer in config.get("config", {}).get("layers", [])]


def check_hidden_layers(pairs, student_names, teacher_path):
    """Raises `ConfigError` naming any hidden-state layer the models do not have."""
    teacher_names = saved_layer_names(teacher_path)
    for side, names, index in (("student", student_names, 0), ("teacher", teacher_names, 1)):
        missing = [pair[index] for pair in pairs if pair[index] not in names]
        if missing:
            raise ConfigError(
                f"`distillation.hidden_layers` names {side} layer(s) {missing} that the "
                f"{side} does not have. Its named layers: {[n for n in names if n]}")


def load_teacher(teacher_dir, keras):
    """The teacher run's saved model, as a model of the engine `keras`.

    A teacher saved by the other engine is rebuilt with this toolkit's builder (the same
    weight layout in both engines) and given the saved weights.

    Args:
        teacher_dir: str. A finished run directory.
        keras: the student's `keras` module.

    Returns:
        The teacher model, not trainable.
    """
    from tf_effitrain.engine import engine_name, get_keras

    teacher_cfg = load_config(os.path.join(teacher_dir, _CONFIG_FILE))
    path = os.path.join(teacher_dir, _MODEL_FILE)
    saved_engine = teacher_cfg.runtime.engine
    if saved_engine == engine_name(keras):
        model = keras.models.load_model(path, compile=False)
    else:
        if teacher_cfg.model.kind != "transformer":
            raise ConfigError(
                f"The teacher ({teacher_cfg.model.kind}, engine {saved_engine}) cannot "
                f"move to the student's engine {engine_name(keras)}: set "
                f"`runtime.engine: {saved_engine}` for the student.")
        from tf_effitrain.models import build_transformer_classifier

        saved = get_keras(saved_engine).models.load_model(path, compile=False)
        vocab = sum(1 for _ in open(os.path.join(teacher_dir, "vocab.txt"), encoding="utf-8"))
        model = build_transformer_classifier(
            teacher_cfg.model, vocab, int(saved.outputs[0].shape[-1]),
            teacher_cfg.data.max_length, keras=keras, name=saved.name)
        model.set_weights(saved.get_weights())
    model.trainable = False
    return model


def teacher_logits(teacher, ds, batch_size=64, max_length=None, log=None):
    """The teacher's logits for every example of an unbatched dataset, in its order.

    Examples are batched by length (little padding) and put back in order by index,
    so this costs one inference pass.

    Args:
        teacher: Model. Called with `training=False`.
        ds: `tf.data.Dataset` of `(token_ids (len,), label)`.
        batch_size: int. Inference batch size.
        max_length: int or None. Longest sequence (bucket boundaries); None: one bucket
            per batch padded to its longest.
        log: callable or None. Receives one progress line.

    Returns:
        float32 NumPy array `[examples, classes]`.
    """
    import numpy as np
    import tensorflow as tf

    from tf_effitrain.data.batching import batch_dataset

    start = time.time()

    def with_index(index, example):
        return example[0], index

    indexed = ds.enumerate().map(with_index)
    batches = batch_dataset(indexed, "bucket", batch_size, max_length or 512)

    @tf.function(reduce_retracing=True)
    def infer(ids):
        return tf.cast(teacher(ids, training=False), tf.float32)

    rows, order = [], []
    for ids, index in batches:
        rows.append(infer(ids).numpy())
        order.append(index.numpy())
    if not rows:
        raise ValueError("The training split is empty: no teacher logits to compute.")
    logits = np.empty((sum(len(i) for i in order), rows[0].shape[-1]), np.float32)
    for index, values in zip(order, rows):
        logits[index] = values
    if log:
        log(f"teacher: logits for {len(logits)} training examples in "
            f"{time.time() - start:.1f} s (computed once)")
    return logits


def teacher_summary(teacher_dir):
    """A teacher run's test accuracy and model config, for the student's report.

    Args:
        teacher_dir: str. A finished run directory.

    Returns:
        dict: `test_accuracy` (float or None: the last test record of its
        metrics.jsonl) and `config` (its `model:` section as a dict).
    """
    from tf_effitrain.training.report import last_test_accuracy

    accuracy = last_test_accuracy(teacher_dir)
    config = load_config(os.path.join(teacher_dir, _CONFIG_FILE))
    return {"test_accuracy": accuracy, "config": dataclasses.asdict(config.model)}
