"""Export: TFLite in four quantizations and SavedModel, audited, verified by running the
file, and usable on raw text. Every number checked here comes from a real interpreter run.

Stated margins (tiny model, 72 padded training rows and the 9-example test split):
float32 and float16 files agree with the Keras model on every row (logits within 1e-4 /
2e-2); dynamic-range within 5% of rows; full int8 within 10% of rows, on padded inputs.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tf_effitrain.cli import main

from harness import REPO, tiny_config


LENGTH = 128  # most texts are shorter: most rows are padded


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    """The shared tiny Keras 3 run (`max_length` 128), copied, exported in every format."""
    from tf_effitrain.export import export_run

    config, result = finished_run
    assert config.data.max_length == LENGTH
    run_dir = str(tmp_path_factory.mktemp("export") / "run")
    shutil.copytree(result.run_dir, run_dir)
    report = export_run(run_dir, formats=("tflite", "saved_model"),
                        debug_quantization=True, log=None)
    return run_dir, report


def _training_rows(run_dir, length=LENGTH):
    from tf_effitrain.config import load_config
    from tf_effitrain.data import prepare_data
    from tf_effitrain.export import representative_rows

    config = load_config(os.path.join(run_dir, "config.yaml"))
    data = prepare_data(config.data, config.runtime.seed, run_dir)
    return representative_rows(data.train, length, 72)


@pytest.mark.parametrize("quantization, agreement, logit_tol", [
    ("none", 1.0, 1e-4), ("float16", 1.0, 2e-2), ("dynamic", 0.95, None),
    ("int8", 0.90, None)])
def test_each_quantization_runs_and_agrees_with_keras(exported, quantization, agreement,
                                                      logit_tol):
    import keras

    from tf_effitrain.export import run_tflite

    run_dir, report = exported
    name = f"model_{'float32' if quantization == 'none' else quantization}.tflite"
    path = os.path.join(run_dir, "export", name)
    rows = _training_rows(run_dir)
    # Padded rows (the full-int8 pitfall) are most of them.
    assert np.mean((rows == 0).any(axis=1)) >= 0.5
    want = np.asarray(keras.models.load_model(os.path.join(run_dir, "model.keras"))(rows))
    # An empty text (all padding) must run too: int8 DIV refuses a zero divisor.
    empty = np.zeros((1, rows.shape[1]), np.int32)
    for delegates in ("xnnpack", "none"):
        empty_logits, _ = run_tflite(path, empty, delegates)
        assert np.isfinite(empty_logits).all()
        got, times = run_tflite(path, rows, delegates)
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= agreement, delegates
        if logit_tol:
            assert np.max(np.abs(got - want)) <= logit_tol
        assert len(times) == len(rows) and min(times) > 0
    # The report's rows were read from the same kind of run on the test split.
    mine = [r for r in report["rows"] if r.get("file") == name]
    assert {r["delegates"] for r in mine} == {"xnnpack", "none"}
    for r in mine:
        assert r["size_bytes"] == os.path.getsize(path)
        assert 0 < r["gzip_bytes"] < r["size_bytes"] * 1.01
        assert r["latency_p90_ms"] >= r["latency_p50_ms"] > 0
        assert r["examples"] == report["examples"] == 9
        assert abs(r["accuracy"] - report["keras"]["accuracy"]) <= 1 - agreement + 1e-9


def test_report_files_and_audit(exported):
    run_dir, report = exported
    on_disk = json.load(open(os.path.join(run_dir, "export_report.json")))
    assert on_disk["rows"] == report["rows"]
    markdown = open(os.path.join(run_dir, "export_report.md"), encoding="utf-8").read()
    for name in ("model_float32.tflite", "model_int8.tflite", "saved_model/",
                 "Per-layer int8 error"):
        assert name in markdown
    assert report["debug_quantization"] and all(
        r["rmse_over_scale"] >= 0 for r in report["debug_quantization"])
    audit = report["audits"]["model_int8.tflite"]
    assert audit["flex_ops"] == [] and audit["dynamic_tensors"] == []
    assert "FULLY_CONNECTED" in audit["ops"] and "QUANTIZE" in audit["ops"]
    # Only casts of the integer token ids stay outside int8 arithmetic.
    assert set(audit["float_ops"]) <= {"CAST", "NEG"}
    saved = [r for r in report["rows"] if r["format"] == "saved_model"][0]
    assert saved["agreement"] == 1.0 and saved["max_logit_diff"] <= 1e-4
    weights = {name: a["constant_bytes"] for name, a in report["audits"].items()}
    # Weights in 8 bits: about 4x smaller than float32 (in this tiny model the graph's
    # names and quantization parameters are a large part of the file; the demo
    # model's file shrinks 3.4x, its weights 4.0x).
    assert weights["model_int8.tflite"] <= 0.3 * weights["model_float32.tflite"]
    assert weights["model_float16.tflite"] <= 0.55 * weights["model_float32.tflite"]


def test_a_planted_flex_op_is_reported_before_conversion(tmp_path):
    import keras
    import tensorflow as tf

    from tf_effitrain.export import ExportError, export_tflite

    class Cumprod(keras.layers.Layer):  # no TFLite builtin: needs Flex
        def call(self, x):
            return tf.math.cumprod(tf.cast(x, tf.float32) + 1.0, axis=-1)

    inputs = keras.Input((8,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Dense(2)(Cumprod()(inputs)[:, :4]))
    path = str(tmp_path / "flex.tflite")
    with pytest.raises(ExportError, match="no builtin kernel for: FlexCumprod.*"
                                          "--allow-flex"):
        export_tflite(model, path, sequence_length=8)
    assert not os.path.exists(path)
    audit = export_tflite(model, path, sequence_length=8, allow_flex=True)
    assert audit.flex_ops == ["FlexCumprod"] and os.path.isfile(path)


def test_predict_tokenizes_like_training_and_matches_keras(exported):
    import keras

    from tf_effitrain.config import load_config
    from tf_effitrain.data import load_examples, prepare_data
    from tf_effitrain.data.splits import split_indices
    from tf_effitrain.export import TextClassifier

    run_dir, _ = exported
    config = load_config(os.path.join(run_dir, "config.yaml"))
    examples = load_examples(config.data)
    parts = split_indices(examples.labels, config.data.val_fraction,
                          config.data.test_fraction, config.runtime.seed)
    texts = [examples.texts[i] for i in parts["test"]]
    data = prepare_data(config.data, config.runtime.seed, run_dir)
    pipeline = sorted(tuple(int(t) for t in row if t) for ids, _ in data.test
                      for row in np.asarray(ids))
    for model_file in ("model.keras", os.path.join("export", "model_float32.tflite")):
        classifier = TextClassifier(os.path.join(run_dir, model_file))
        ids = classifier.token_ids(texts)
        assert sorted(tuple(int(t) for t in row) for row in ids) == pipeline
        labels, probabilities = classifier.predict(texts)
        model = keras.models.load_model(os.path.join(run_dir, "model.keras"))
        want = [classifier.class_names[i] for i in np.asarray(model(
            classifier._pad(ids, LENGTH))).argmax(-1)]
        assert labels == want
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_cli_export_and_predict(finished_run, tmp_path, capsys):
    _, result = finished_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(result.run_dir, run_dir)
    assert main(["export", run_dir, "--quantize", "int8", "--samples", "20",
                 "--sequence-length", "24", "--int8-output"]) == 0
    assert "export_report.md" in capsys.readouterr().out
    model = os.path.join(run_dir, "export", "model_int8.tflite")
    from tf_effitrain.export import load_interpreter

    output = load_interpreter(model).get_output_details()[0]
    assert output["dtype"] == np.int8 and output["quantization"][0] > 0
    report = json.load(open(os.path.join(run_dir, "export_report.json")))
    assert all(r["agreement"] >= 0.75 for r in report["rows"])  # dequantized: 9 examples
    assert main(["predict", model, "Klingons on the starboard bow", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["label"] in record["probabilities"]
    texts = tmp_path / "texts.txt"
    texts.write_text("Beam me up\nThe president said\n", encoding="utf-8")
    assert main(["predict", os.path.join(run_dir, "model.keras"), "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[2] == "Beam me up"
    done = subprocess.run([sys.executable, "-m", "tf_effitrain.cli", "predict", model],
                          input="one line from stdin\n", capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0 and done.stdout.strip().endswith("one line from stdin")
    assert main(["predict", str(tmp_path / "missing.tflite"), "x"]) == 2
    assert "Model file not found" in capsys.readouterr().err


def test_export_section_of_train_in_the_tf_keras_engine(small_jsonl, tmp_path):
    """`export:` in the config exports right after training; tf_keras models export
    through `tf.saved_model.save`."""
    from tf_effitrain.training import train

    result = train(tiny_config(small_jsonl, tmp_path / "tfk", "runtime.engine=tf_keras",
                               "training.epochs=1",
                               "export.quantize=[none, float16, dynamic, int8]",
                               "export.delegates=[none]",
                               "export.representative_samples=16"))
    report = json.load(open(os.path.join(result.run_dir, "export_report.json")))
    assert report["engine"] == "tf_keras"
    rows = {r["quantization"]: r for r in report["rows"]}
    assert set(rows) == {"none", "float16", "dynamic", "int8"}
    assert {r["delegates"] for r in rows.values()} == {"none"}
    assert rows["none"]["max_logit_diff"] <= 1e-4 and rows["float16"]["agreement"] == 1.0
    assert rows["int8"]["agreement"] >= 0.75  # 9 test examples
    assert "## Export" in open(result.report_path, encoding="utf-8").read()


def test_export_errors_are_one_line(tmp_path, capsys, finished_run):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "finished `tf-effitrain train` run" in capsys.readouterr().err
    _, result = finished_run
    assert main(["export", result.run_dir, "--quantize", "int4"]) == 2
    assert "`quantize` must be among" in capsys.readouterr().err
    assert main(["export", result.run_dir, "--sequence-length", "129"]) == 2
    assert "longer than the model's `data.max_length` (128)" in capsys.readouterr().err
