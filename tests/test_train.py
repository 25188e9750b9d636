"""End-to-end: `train`, `evaluate_run` and the `tf-effitrain` command line on real text."""

import json
import os
import shutil
import warnings

import pytest

from tf_effitrain.cli import main
from tf_effitrain.config import load_config
from tf_effitrain.training import RunResult, TrainerPlugin, evaluate_run, read_metrics, train

from harness import TINY, max_abs_diff, tiny_config, write_jsonl


def test_finished_run_directory_is_complete(finished_run, tmp_path):
    config, result = finished_run
    assert isinstance(result, RunResult)
    run_dir = result.run_dir
    for name in ("config.yaml", "vocab.txt", "metrics.jsonl", "model.keras", "report.md",
                 "curves.png", "logs", "run.json",
                 f"checkpoints/ckpt-{2 * result.train_batches:09d}.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert json.load(open(os.path.join(run_dir, "run.json")))["status"] == "finished"
    records = read_metrics(result.metrics_path)
    epochs = [r for r in records if r["split"] == "train"]
    assert [r["epoch"] for r in epochs] == [1, 2] and result.epochs_run == 2
    # One optimizer update per batch (length buckets can add a partial batch per bucket).
    assert epochs[-1]["updates"] == 2 * result.train_batches
    test = [r for r in records if r["split"] == "test"][0]
    assert 0.0 <= test["accuracy"] <= 1.0
    assert test["majority_baseline"] == pytest.approx(3 / 9)
    assert result.params["trainable"] > 0
    # The resolved config reloads to the same config.
    assert load_config(os.path.join(run_dir, "config.yaml")) == config
    # The saved model reloads and evaluates to the same test metrics (in a copy: the
    # evaluation appends to metrics.jsonl).
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    again = evaluate_run(copy)
    assert again["accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(test["loss"], rel=1e-4)


def test_best_epoch_weights_are_kept_and_reported(finished_run, tmp_path):
    """The saved model holds the weights of the epoch with the best validation accuracy
    (the default `training.best_metric`; the first epoch that reached it): its
    validation loss and accuracy are that epoch's."""
    config, result = finished_run
    assert config.training.best_metric == "val_accuracy"
    records = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    best = max(records, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    assert result.best_epoch == best["epoch"]
    copy = str(tmp_path / "copy")
    shutil.copytree(result.run_dir, copy)
    again = evaluate_run(copy, split="validation")
    assert again["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    report = open(result.report_path, encoding="utf-8").read()
    assert f"epoch {best['epoch']} of 2 (best `val_accuracy`)" in report
    test = [r for r in read_metrics(result.metrics_path) if r["split"] == "test"][0]
    assert test["epoch"] == best["epoch"]


@pytest.mark.parametrize("best_epoch, epochs", [(1, 3), (3, 3)])
def test_best_weights_callback_restores_the_best_epoch(best_epoch, epochs):
    """Restores the best epoch's weights even when training runs to the end (and keeps
    the last ones when the last epoch is the best)."""
    import numpy as np

    from tf_effitrain.engine import get_keras
    from tf_effitrain.training import best_weights_class

    keras = get_keras("keras3")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    seen = {}

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch + 1] = model.get_weights()

    class FakeValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = 0.1 if epoch + 1 == best_epoch else 1.0 + epoch

    best = best_weights_class(keras)("val_loss")
    x = np.ones((8, 2), "float32")
    model.fit(x, x[:, :1], epochs=epochs, verbose=0,
              callbacks=[Record(), FakeValidation(), best])
    assert best.best_epoch == best_epoch
    assert max_abs_diff(model.get_weights(), seen[best_epoch]) == 0.0


@pytest.mark.parametrize("engine", ["keras3", "tf_keras"])
def test_best_weights_with_ema_keep_the_best_epochs_averages(engine):
    """With `use_ema`, `fit` ends by copying the averages in; the best epoch's averages
    are what is kept, whether or not it is the last."""
    import numpy as np

    from tf_effitrain.engine import get_keras
    from tf_effitrain.training import best_weights_class

    keras = get_keras(engine)
    x = np.random.RandomState(0).rand(16, 2).astype("float32")
    for best_epoch in (1, 3):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5),
                      loss="mse")
        averages = {}

        class Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                opt = model.optimizer
                averages[epoch + 1] = [v.numpy() for v in
                                       opt._model_variables_moving_average]
                logs["val_loss"] = 0.1 if epoch + 1 == best_epoch else 1.0 + epoch

        best = best_weights_class(keras)("val_loss")
        model.fit(x, x[:, :1], epochs=3, batch_size=4, verbose=0,
                  callbacks=[Record(), best])
        assert best.best_epoch == best_epoch
        assert max_abs_diff(model.get_weights(), averages[best_epoch]) <= 1e-7


def test_a_new_run_relearns_the_vocabulary_when_the_seed_changes(tmp_path):
    """Another seed puts other examples in the training split: the cached vocabulary
    (learned on the old one) is not reused by a fresh run; a resumed run keeps it."""
    from tf_effitrain.config import save_config
    from tf_effitrain.training.trainer import _reusable_vocab

    run_dir = tmp_path / "seed"
    run_dir.mkdir()
    first = load_config(None, ["runtime.seed=1"])
    save_config(first, str(run_dir / "config.yaml"))
    (run_dir / "vocab.txt").write_text("[PAD]\n")
    assert _reusable_vocab(str(run_dir), first, "fresh") == str(run_dir / "vocab.txt")
    second = load_config(None, ["runtime.seed=2"])
    assert _reusable_vocab(str(run_dir), second, "fresh") is None
    assert _reusable_vocab(str(run_dir), second, "resume") == str(run_dir / "vocab.txt")


def test_without_validation_split_the_last_weights_are_kept(small_jsonl, tmp_path):
    config = tiny_config(small_jsonl, tmp_path / "noval", "data.val_fraction=0.0",
                         "training.epochs=1", "training.verbose=1")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train(config)
    lines = out.getvalue()
    assert result.best_epoch is None
    assert "no validation split, the last epoch's weights are kept" in lines


@pytest.mark.parametrize("engine", ["tf_keras"])
def test_train_in_the_tf_keras_engine(small_jsonl, tmp_path, engine):
    run_dir = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(tiny_config(small_jsonl, run_dir, f"runtime.engine={engine}",
                                   "training.epochs=1"))
    # Every split declares its length: no epoch is cut short or guessed.
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    assert os.path.isfile(result.model_path)
    assert evaluate_run(run_dir)["accuracy"] == pytest.approx(result.test["accuracy"],
                                                              abs=1e-6)


def test_train_with_gradient_accumulation_saves_the_plain_model(small_jsonl, tmp_path):
    from tf_effitrain.engine import get_keras

    run_dir = str(tmp_path / "acc")
    result = train(tiny_config(small_jsonl, run_dir, "training.accumulation_steps=4",
                               "data.batching=fixed"))
    # 72 training examples in effective batches of 16 x 4 = 64: 2 updates per epoch.
    assert result.train_batches == 2
    epochs = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert [r["updates"] for r in epochs] == [2, 4]
    model = get_keras("keras3").models.load_model(result.model_path)
    assert model.name == "transformer_classifier"  # not the training wrapper


def test_xla_with_accumulation_trains_bucketed_batches(small_jsonl, tmp_path):
    """`training.jit_compile: true` with accumulation and the default bucketed batching
    (dynamic shapes, uneven last batches) trains under XLA. Exactness under XLA is
    tested in test_accumulation.py."""
    result = train(tiny_config(small_jsonl, tmp_path / "xla", "training.jit_compile=true",
                               "training.accumulation_steps=3", "data.batch_size=5",
                               "data.bucket_boundaries=[16]", "training.epochs=1"))
    records = [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert records[0]["updates"] == result.train_batches
    assert records[0]["loss"] == records[0]["loss"]  # finite, not NaN


def test_a_new_run_in_the_same_directory_starts_fresh(small_jsonl, tmp_path):
    run_dir = str(tmp_path / "again")
    first = train(tiny_config(small_jsonl, run_dir, "training.epochs=1"))
    vocab = open(os.path.join(run_dir, "vocab.txt")).read()
    second = train(tiny_config(small_jsonl, run_dir, "training.epochs=1"), overwrite=True)
    # One run's records only, and the cached vocabulary reused (same data settings).
    assert [r["split"] for r in read_metrics(second.metrics_path)] == ["train", "test"]
    assert open(os.path.join(run_dir, "vocab.txt")).read() == vocab
    # Different data settings: the vocabulary is learned again, not silently reused.
    train(tiny_config(small_jsonl, run_dir, "training.epochs=1", "data.vocab_size=120"),
          overwrite=True)
    relearned = open(os.path.join(run_dir, "vocab.txt")).read().split()
    assert relearned != vocab.split() and len(relearned) <= 120
    assert first.train_batches == second.train_batches


def test_plugins_hook_into_the_stages(small_jsonl, tmp_path):
    calls = []

    class Spy(TrainerPlugin):
        def transform_model(self, ctx, model):
            calls.append("transform")
            return model

        def callbacks(self, ctx):
            calls.append("callbacks")
            return []

        def finish_model(self, ctx, model):
            calls.append("finish")
            return model

        def after_finish(self, ctx):
            calls.append(("after", os.path.isfile(ctx.model_path)))
            ctx.report_lines.append("## Spy section")

    result = train(tiny_config(small_jsonl, tmp_path / "spy", "training.epochs=1"),
                   plugins=[Spy()])
    assert calls == ["transform", "callbacks", "finish", ("after", True)]
    assert "## Spy section" in open(result.report_path, encoding="utf-8").read()


@pytest.mark.slow
def test_demo_config_learns_the_embedded_dataset(tmp_path):
    """The shipped demo beats the majority-class baseline on held-out real text."""
    config = load_config("configs/demo_cpu.yaml",
                         [f"training.run_dir={tmp_path / 'demo'}", "training.verbose=0",
                          "training.epochs=3"])
    result = train(config)
    assert result.test["accuracy"] > result.majority_baseline + 0.1


# ---- command line ---------------------------------------------------------------------

def _sets(*items):
    return sum((["--set", s] for s in items), [])


def test_cli_train_and_evaluate(small_jsonl, tmp_path, capsys):
    run_dir = str(tmp_path / "cli")
    assert main(["train", "configs/demo_cpu.yaml", "--run-dir", run_dir,
                 *_sets(*TINY, f"data.path={small_jsonl}", "training.epochs=1")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "majority-class baseline" in out
    assert "weights kept:" in out and f"run directory: {run_dir}" in out
    assert main(["evaluate", run_dir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and 0.0 <= result["accuracy"] <= 1.0


def _fails_with(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("tf-effitrain: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.batch_sise=8"],
         "Unknown config key `data.batch_sise`. Did you mean `data.batch_size`?"),
        (["--set", "model.norm=rmsnorm"], "Did you mean `rms`?"),
        (["--set", "data.path=/nonexistent/x.jsonl"], "JSONL file not found"),
        (["--set", "training.epochs=zero"], "`training.epochs` must be of type int"),
        (["--set", "training.epochs=[1"], "Override `training.epochs=[1`: the value is not "
                                          "valid YAML"),
        (["--set", "data.path=data"], "`data.path` is a directory: 'data'"),
        (["--set", "data.source=csv", "--set", "data.path=data"],
         "`data.path` is a directory: 'data'"),
    ],
)
def test_cli_bad_input_is_one_line_and_nothing_is_trained(tmp_path, capsys, args, message):
    run_dir = tmp_path / "bad"
    _fails_with(capsys, ["train", "configs/demo_cpu.yaml", "--run-dir", str(run_dir), *args],
                message)
    assert not run_dir.exists()


def test_cli_run_directory_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("not a directory")
    _fails_with(capsys, ["train", "configs/demo_cpu.yaml", "--run-dir", str(path)],
                "is a file. Choose another `training.run_dir`")
    assert path.read_text() == "not a directory"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_cli_non_utf8_data_names_file_and_line(tmp_path, capsys, fmt):
    path = tmp_path / f"latin1.{fmt}"
    if fmt == "jsonl":
        text = '{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n'
    else:
        text = "text,label\nok,a\ncaf\xe9,b\n"
    path.write_bytes(text.encode("latin-1"))
    line = 2 if fmt == "jsonl" else 3
    _fails_with(capsys, ["train", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path / "r"),
                         *_sets(f"data.source={fmt}", f"data.path={path}")],
                f"{path}:{line}: not valid UTF-8 (byte 0xe9)")


def test_cli_label_out_of_range_fails_before_training(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t {i}", "label": "abc"[i % 3]}
                                              for i in range(30)])
    _fails_with(capsys, ["train", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path / "r"),
                         *_sets(f"data.path={path}", "data.classes=[a, b]")],
                "label 'c' is out of range")


def test_cli_evaluate_missing_run(tmp_path, capsys):
    err = _fails_with(capsys, ["evaluate", str(tmp_path / "nothing")],
                      "config.yaml' not found")
    assert "finished `tf-effitrain train` run" in err


def test_cli_evaluate_a_run_without_that_split(finished_run, tmp_path, capsys):
    _, result = finished_run
    run_dir = tmp_path / "no_test"
    shutil.copytree(result.run_dir, run_dir)
    config = (run_dir / "config.yaml").read_text().replace("test_fraction: 0.1",
                                                           "test_fraction: 0.0")
    (run_dir / "config.yaml").write_text(config)
    _fails_with(capsys, ["evaluate", str(run_dir)],
                "has no test split (`data.test_fraction: 0`")


def test_cli_corrupt_cached_vocabulary(finished_run, tmp_path, capsys):
    _, result = finished_run
    run_dir = tmp_path / "bad_vocab"
    shutil.copytree(result.run_dir, run_dir)
    (run_dir / "vocab.txt").write_bytes(b"\xff\xfe garbage\n")
    _fails_with(capsys, ["evaluate", str(run_dir)],
                f"Cached vocabulary is corrupt: {run_dir / 'vocab.txt'}:1: not valid UTF-8")
    (run_dir / "vocab.txt").write_text("hello\nworld\n")
    _fails_with(capsys, ["evaluate", str(run_dir)], "does not start with the reserved tokens")


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("tensorflow", "engine", "precision", "strategy", "cpu_bf16"):
        assert key in out


# ---- start-up: no TensorFlow before it is needed ------------------------------------------

def test_help_and_config_errors_do_not_import_tensorflow(tmp_path):
    """`--help`, a config typo and a missing data file answer without importing
    TensorFlow (so in about a second, and with none of its start-up lines)."""
    from harness import run_python

    done = run_python(f"""
        import contextlib, io, sys
        from tf_effitrain.cli import main
        codes = []
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit as e:
                codes.append(e.code)
            try:
                main(["train", "--help"])
            except SystemExit as e:
                codes.append(e.code)
        codes.append(main(["train", "configs/demo_cpu.yaml", "--set", "data.batch_sise=8"]))
        codes.append(main(["train", "configs/demo_cpu.yaml", "--run-dir", {str(tmp_path)!r},
                           "--set", "data.path=/nonexistent.jsonl"]))
        import tf_effitrain
        tf_effitrain.load_config, tf_effitrain.ConfigError
        print(codes, "tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "[0, 0, 2, 2] False False"
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("tf-effitrain: error:") for e in errors)


def test_every_lazy_public_name_is_the_object_not_a_same_named_module():
    """A public function must not share its name with a submodule of its package: once
    the submodule is imported, the package attribute would be the module
    (`et.export_run(...)` -> "'module' object is not callable")."""
    import importlib
    import pkgutil
    import types

    import tf_effitrain

    for info in pkgutil.walk_packages(tf_effitrain.__path__, "tf_effitrain."):
        importlib.import_module(info.name)  # every submodule imported first
    packages = [tf_effitrain] + [importlib.import_module(info.name) for info in
                                 pkgutil.walk_packages(tf_effitrain.__path__, "tf_effitrain.")
                                 if info.ispkg]
    for package in packages:
        for name in getattr(package, "_EXPORTS", {}):
            value = getattr(package, name)
            assert not isinstance(value, types.ModuleType), f"{package.__name__}.{name}"
