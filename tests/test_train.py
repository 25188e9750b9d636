"""End-to-end: `train`, `evaluate_run` and the `tf-effitrain` command line on real text."""

import json
import os
import warnings

import pytest

from tf_effitrain.cli import main
from tf_effitrain.config import load_config
from tf_effitrain.training import evaluate_run, read_metrics, train

TINY = [
    "data.vocab_size=300", "data.max_length=32", "data.batch_size=16",
    "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64",
    "training.epochs=2", "training.verbose=0",
]


def _config(small_jsonl, run_dir, *extra):
    return load_config(None, [f"data.path={small_jsonl}", f"training.run_dir={run_dir}",
                              *TINY, *extra])


@pytest.mark.parametrize("engine", ["keras3", "tf_keras"])
def test_train_writes_a_complete_run_directory(small_jsonl, tmp_path, engine):
    run_dir = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_config(small_jsonl, run_dir, f"runtime.engine={engine}"))
    # Every split declares its length: no epoch is cut short or guessed.
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    for name in ("config.yaml", "vocab.txt", "metrics.jsonl", "model.keras", "report.md",
                 "curves.png", "logs", "checkpoints/epoch002.weights.h5"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    records = read_metrics(result["metrics_path"])
    epochs = [r for r in records if r["split"] == "train"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    # One optimizer update per batch: 72 training examples in batches of 16 -> 5 batches
    # (length buckets can add a partial batch per bucket, never remove one).
    assert epochs[-1]["updates"] == 2 * result["train_batches"]
    test = [r for r in records if r["split"] == "test"][0]
    assert 0.0 <= test["accuracy"] <= 1.0
    assert test["majority_baseline"] == pytest.approx(3 / 9)
    assert result["params"]["trainable"] > 0
    report = open(result["report_path"], encoding="utf-8").read()
    assert "test accuracy" in report and "curves.png" in report
    # The saved model reloads and evaluates to the same test metrics.
    again = evaluate_run(run_dir)
    assert again["accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(test["loss"], rel=1e-4)


def test_train_with_gradient_accumulation_saves_the_plain_model(small_jsonl, tmp_path):
    from tf_effitrain.engine import get_keras

    run_dir = str(tmp_path / "acc")
    result = train(_config(small_jsonl, run_dir, "training.accumulation_steps=4",
                           "data.batching=fixed"))
    # 72 training examples in effective batches of 16 x 4 = 64: 2 updates per epoch.
    assert result["train_batches"] == 2
    epochs = [r for r in read_metrics(result["metrics_path"]) if r["split"] == "train"]
    assert [r["updates"] for r in epochs] == [2, 4]
    model = get_keras("keras3").models.load_model(result["model_path"])
    assert model.name == "transformer_classifier"  # not the training wrapper
    assert evaluate_run(run_dir)["accuracy"] == pytest.approx(result["test"]["accuracy"])


def test_a_new_run_in_the_same_directory_starts_fresh(small_jsonl, tmp_path):
    run_dir = str(tmp_path / "again")
    first = train(_config(small_jsonl, run_dir, "training.epochs=1"))
    vocab = open(os.path.join(run_dir, "vocab.txt")).read()
    second = train(_config(small_jsonl, run_dir, "training.epochs=1"))
    # One run's records only, and the cached vocabulary reused (same data settings).
    assert [r["split"] for r in read_metrics(second["metrics_path"])] == ["train", "test"]
    assert open(os.path.join(run_dir, "vocab.txt")).read() == vocab
    # Different data settings: the vocabulary is learned again, not silently reused.
    train(_config(small_jsonl, run_dir, "training.epochs=1", "data.vocab_size=120"))
    relearned = open(os.path.join(run_dir, "vocab.txt")).read().split()
    assert relearned != vocab.split() and len(relearned) <= 120
    assert first["train_batches"] == second["train_batches"]


def test_resolved_config_reloads(small_jsonl, tmp_path):
    run_dir = str(tmp_path / "run")
    config = _config(small_jsonl, run_dir, "training.epochs=1", "model.norm=rms")
    train(config)
    assert load_config(os.path.join(run_dir, "config.yaml")) == config


def test_demo_config_learns_the_embedded_dataset(tmp_path):
    """The shipped demo beats the majority-class baseline on held-out real text."""
    run_dir = str(tmp_path / "demo")
    config = load_config("configs/demo_cpu.yaml",
                         [f"training.run_dir={run_dir}", "training.verbose=0",
                          "training.epochs=3"])
    result = train(config)
    assert result["test"]["accuracy"] > result["majority_baseline"] + 0.1


# ---- command line ---------------------------------------------------------------------

def test_cli_train_and_evaluate(small_jsonl, tmp_path, capsys):
    run_dir = str(tmp_path / "cli")
    sets = sum((["--set", s] for s in TINY + [f"data.path={small_jsonl}"]), [])
    assert main(["train", "configs/demo_cpu.yaml", "--run-dir", run_dir, *sets]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "majority-class baseline" in out
    assert f"run directory: {run_dir}" in out
    assert main(["evaluate", run_dir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.batch_sise=8"],
         "Unknown config key `data.batch_sise`. Did you mean `data.batch_size`?"),
        (["--set", "model.norm=rmsnorm"], "Did you mean `rms`?"),
        (["--set", "data.path=/nonexistent/x.jsonl"], "JSONL file not found"),
        (["--set", "training.epochs=zero"], "`training.epochs` must be of type int"),
    ],
)
def test_cli_bad_input_is_one_line_and_nothing_is_trained(tmp_path, capsys, args, message):
    run_dir = tmp_path / "bad"
    code = main(["train", "configs/demo_cpu.yaml", "--run-dir", str(run_dir), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tf-effitrain: error: ") and message in err
    assert "Traceback" not in err
    assert not (run_dir / "model.keras").exists()


def test_cli_label_out_of_range_fails_before_training(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t {i}", "label": ["a", "b", "c"][i % 3]})
                            + "\n" for i in range(30)))
    code = main(["train", "configs/demo_cpu.yaml", "--run-dir", str(tmp_path / "r"),
                 "--set", f"data.path={path}", "--set", "data.classes=[a, b]"])
    assert code == 2
    assert "label 'c' is out of range" in capsys.readouterr().err


def test_cli_evaluate_missing_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml' not found" in err and "finished `tf-effitrain train` run" in err


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("tensorflow", "engine", "precision", "strategy", "cpu_bf16"):
        assert key in out
