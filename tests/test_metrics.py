"""Metrics for imbalanced tasks: per-class figures and macro-F1 (NumPy and as a Keras
metric, plain, packed and mirrored), balanced class weights, and the run's use of both
(`data.class_weight`, `training.best_metric: val_macro_f1`, report.md)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from harness import ENGINES, tiny_config
from tf_effitrain.cli import main
from tf_effitrain.data.weights import balanced_class_weights, class_weighted
from tf_effitrain.engine import get_keras
from tf_effitrain.training.metrics import (
    classification_metrics,
    confusion_matrix,
    macro_f1,
)

# Hand-computed: class 3 is never predicted (precision 0 by convention) and never
# recognised (recall 0); class 0: precision 2/4, recall 2/3, F1 4/7.
LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
PREDICTIONS = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]


def test_per_class_figures_match_the_hand_computed_ones():
    confusion = confusion_matrix(LABELS, PREDICTIONS, 4)
    np.testing.assert_array_equal(confusion, [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0],
                                              [1, 0, 0, 0]])
    m = classification_metrics(confusion, ["a", "b", "c", "d"])
    rows = {r["class"]: r for r in m["per_class"]}
    np.testing.assert_allclose([rows[c]["precision"] for c in "abcd"], [0.5, 0.5, 0.75, 0])
    np.testing.assert_allclose([rows[c]["recall"] for c in "abcd"], [2 / 3, 0.5, 0.75, 0])
    np.testing.assert_allclose([rows[c]["f1"] for c in "abcd"], [4 / 7, 0.5, 0.75, 0])
    assert [rows[c]["support"] for c in "abcd"] == [3, 2, 4, 1]
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx((4 / 7 + 0.5 + 0.75) / 4)
    assert m["weighted_f1"] == pytest.approx((4 / 7 * 3 + 0.5 * 2 + 0.75 * 4) / 10)
    json.dumps(m)  # JSON-ready


def _reference(labels, predictions, num_classes):
    """Per-class F1 counted example by example (an independent NumPy-free reference)."""
    f1s = []
    for c in range(num_classes):
        tp = sum(1 for y, p in zip(labels, predictions) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, predictions) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, predictions) if y == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall
                   else 0.0)
    return f1s


def test_macro_f1_matches_an_example_by_example_reference_on_skewed_data():
    rng = np.random.default_rng(0)
    # Imbalanced, class 4 absent from the labels, class 3 rarely predicted.
    labels = rng.choice(5, size=400, p=[0.6, 0.25, 0.1, 0.05, 0.0])
    predictions = np.where(rng.random(400) < 0.7, labels, rng.choice(3, size=400))
    m = classification_metrics(confusion_matrix(labels, predictions, 5))
    want = _reference(labels.tolist(), predictions.tolist(), 5)
    np.testing.assert_allclose([r["f1"] for r in m["per_class"]], want, atol=1e-12)
    assert m["macro_f1"] == pytest.approx(np.mean(want), abs=1e-12)


def test_confusion_matrix_rejects_bad_indices():
    with pytest.raises(ValueError, match=r"`labels` must be class indices in \[0, 3\)"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix([0, 1], [0], 3)


def _logits(predictions, num_classes, rng):
    """Random logits whose argmax is `predictions`."""
    logits = rng.normal(size=(len(predictions), num_classes)).astype(np.float32)
    logits[np.arange(len(predictions)), predictions] = 10.0
    return logits


@pytest.mark.parametrize("engine", ENGINES)
def test_keras_metric_streams_to_the_numpy_figure(engine):
    keras = get_keras(engine)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=90)
    predictions = np.where(rng.random(90) < 0.6, labels, rng.integers(0, 4, size=90))
    logits = _logits(predictions, 4, rng)
    metric = macro_f1(4, keras)
    for start in range(0, 90, 32):  # three batches, the last short
        metric.update_state(labels[start:start + 32], logits[start:start + 32])
    want = classification_metrics(confusion_matrix(labels, predictions, 4))["macro_f1"]
    assert float(metric.result()) == pytest.approx(want, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


@pytest.mark.parametrize("engine", ENGINES)
def test_keras_metric_counts_each_real_packed_slot_once(engine):
    """Packed batches: `[rows, slots]` labels with weights > 0 on real slots (of any
    size); the empty slots' predictions must not count."""
    keras = get_keras(engine)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(4, 5))
    predictions = np.where(rng.random((4, 5)) < 0.5, labels, rng.integers(0, 3, (4, 5)))
    logits = _logits(predictions.reshape(-1), 3, rng).reshape(4, 5, 3)
    weights = (rng.random((4, 5)) < 0.6) * 2.5  # packed weights: equal, not 1
    metric = macro_f1(3, keras)
    metric.update_state(labels, logits, sample_weight=weights)
    real = weights.reshape(-1) > 0
    want = classification_metrics(confusion_matrix(
        labels.reshape(-1)[real], predictions.reshape(-1)[real], 3))["macro_f1"]
    assert float(metric.result()) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_keras_metric_config_round_trip(engine):
    keras = get_keras(engine)
    metric = macro_f1(7, keras, name="f1")
    config = keras.metrics.serialize(metric)
    again = keras.metrics.deserialize(config)
    assert type(again) is type(metric)
    assert again.num_classes == 7 and again.name == "f1"
    assert again.get_config() == metric.get_config()
    with pytest.raises(ValueError, match="`num_classes` must be an integer >= 2. "
                                         "Received: num_classes=1"):
        macro_f1(1, keras)


def test_keras_metric_sums_over_replicas(mirrored):
    keras = get_keras("keras3")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=64)
    with mirrored.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[macro_f1(3, keras)])
    got = model.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)["macro_f1"]
    predictions = np.argmax(model.predict(x, verbose=0), axis=-1)
    want = classification_metrics(confusion_matrix(y, predictions, 3))["macro_f1"]
    assert got == pytest.approx(want, abs=1e-6)


def test_balanced_class_weights_are_scikit_learns():
    labels = [0] * 6 + [1] * 3 + [2]
    # n / (classes * count): 10 / 18, 10 / 9, 10 / 3
    np.testing.assert_allclose(balanced_class_weights(labels, 3), [10 / 18, 10 / 9, 10 / 3])
    with pytest.raises(ValueError, match=r"no example of class\(es\) \[3\]"):
        balanced_class_weights(labels, 4)
    with pytest.raises(ValueError, match="class indices"):
        balanced_class_weights([0, 5], 3)


def test_class_weights_change_the_loss_as_specified():
    """Keras' weighted mean: sum(w[y_i] * ce_i) / n, plain and on packed batches."""
    keras = get_keras("keras3")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = np.array([0] * 8 + [1] * 3 + [2], np.int32)
    weights = balanced_class_weights(y, 3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    logits = model.predict(x, verbose=0)
    shifted = logits - logits.max(-1, keepdims=True)
    ce = -(shifted[np.arange(12), y] - np.log(np.exp(shifted).sum(-1)))
    want = float(np.sum(np.asarray(weights)[y] * ce) / 12)
    plain = class_weighted(tf.data.Dataset.from_tensor_slices((x, y)).batch(12), weights)
    assert model.evaluate(plain, verbose=0) == pytest.approx(want, rel=1e-5)
    assert model.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(12),
                          verbose=0) == pytest.approx(float(ce.mean()), rel=1e-5)
    # Packed: the batch's own weights (0 on empty slots) are multiplied, not replaced.
    _, got_y, got_w = next(iter(class_weighted(tf.data.Dataset.from_tensors(
        (x[:2], np.array([[1, 2, 0]]), np.array([[1.5, 1.5, 0.0]], np.float32))), weights)))
    np.testing.assert_allclose(got_w.numpy(), [[1.5 * weights[1], 1.5 * weights[2], 0.0]])


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("batching", ["bucket", "pack"])
def test_a_run_reports_per_class_figures_and_selects_on_macro_f1(small_jsonl, tmp_path,
                                                                 batching):
    from tf_effitrain.training import evaluate_run, train

    run_dir = str(tmp_path / "run")
    config = tiny_config(small_jsonl, run_dir, f"data.batching={batching}",
                         "data.class_weight=balanced", "training.best_metric=val_macro_f1",
                         "training.early_stopping_patience=2", "training.epochs=3")
    result = train(config)
    records = _records(run_dir)
    epochs = [r for r in records if r.get("split") == "train"]
    assert epochs and all("val_macro_f1" in r and "macro_f1" in r for r in epochs)
    best = max(epochs, key=lambda r: r["val_macro_f1"])
    assert result.best_epoch == best["epoch"]
    test = [r for r in records if r.get("split") == "test"][-1]
    confusion = np.asarray(test["confusion"])
    assert confusion.sum() == sum(r["support"] for r in test["per_class"])
    assert confusion.sum() == 9  # 90 examples, test_fraction 0.1
    figures = classification_metrics(confusion)
    assert test["macro_f1"] == pytest.approx(figures["macro_f1"], abs=1e-6)
    assert test["accuracy"] == pytest.approx(figures["accuracy"], abs=1e-6)
    again = evaluate_run(run_dir)  # the saved model, re-evaluated
    assert again["macro_f1"] == pytest.approx(test["macro_f1"], abs=1e-6)
    with open(os.path.join(run_dir, "report.md"), encoding="utf-8") as f:
        report = f.read()
    assert "| test macro-F1 |" in report and "## Per class (test)" in report
    assert "Class weights (balanced, training loss)" in report
    assert os.path.getsize(os.path.join(run_dir, "confusion.png")) > 1000


def test_cli_class_weight_and_best_metric_sections(small_jsonl, tmp_path, capsys):
    run_dir = str(tmp_path / "cli")
    config = tmp_path / "imbalanced.yaml"
    config.write_text(f"data:\n  path: {small_jsonl}\n  class_weight: balanced\n"
                      "training:\n  best_metric: val_macro_f1\n")
    sets = [a for item in ("data.vocab_size=300", "data.max_length=32", "model.num_layers=1",
                           "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64",
                           "training.epochs=1", "runtime.precision=float32")
            for a in ("--set", item)]
    assert main(["train", str(config), "--run-dir", run_dir, *sets]) == 0
    out = capsys.readouterr().out
    assert "test macro-F1:" in out and "(best val_macro_f1)" in out
    assert main(["train", str(config), "--run-dir", str(tmp_path / "bad"),
                 "--set", "data.class_weight=balance"]) == 2
    err = capsys.readouterr().err
    assert "`data.class_weight` must be one of ['balanced']" in err
    assert "Did you mean `balanced`?" in err
