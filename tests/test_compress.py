"""Structured compression: heads and FFN neurons removed into a smaller model of the
same builder, low-rank factorization, scores, `tf-effitrain compress` and the
`compression:` section of `train`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from harness import ENGINES, REPO, max_abs_diff, round_trip_in_fresh_process, tiny_config
from tf_effitrain.compress import (
    analytic_flops,
    factorize,
    prune_heads,
    prune_units,
    select_units,
    unit_scores,
)
from tf_effitrain.config import ConfigError, ModelConfig, load_config
from tf_effitrain.engine import get_keras
from tf_effitrain.models import build_transformer_classifier

VOCAB, CLASSES, SEQ = 60, 3, 16
HEAD = 8  # d_model 32 / 4 heads


def _cfg(**options):
    return ModelConfig(num_layers=2, d_model=32, num_heads=4, ffn_dim=48, dropout=0.0,
                       **options)


def _model(keras, cfg, seed=0):
    keras.utils.set_random_seed(seed)
    return build_transformer_classifier(cfg, VOCAB, CLASSES, SEQ, keras=keras)


def _inputs(n=6, seed=0):
    x = np.random.RandomState(seed).randint(1, VOCAB, size=(n, SEQ)).astype("int32")
    x[::2, 9:] = 0
    return x


def _batches(n=3):
    rng = np.random.RandomState(5)
    return [(_inputs(8, seed=i), rng.randint(0, CLASSES, 8).astype("int32")) for i in range(n)]


def _zero(model, name, cols=None, rows=None):
    layer = model.get_layer(name)
    weights = layer.get_weights()
    if cols is not None:
        weights[0][:, cols] = 0
        if len(weights) > 1:
            weights[1][cols] = 0
    if rows is not None:
        weights[0][rows] = 0
    layer.set_weights(weights)


@pytest.mark.parametrize("engine, options", [("keras3", {}), ("tf_keras", {}),
                                             ("keras3", {"shared_kv": True}),
                                             ("tf_keras", {"share_layers": True})])
def test_removing_zero_units_keeps_outputs_and_drops_predicted_params(engine, options):
    keras = get_keras(engine)
    cfg = _cfg(**options)
    model = _model(keras, cfg)
    blocks = ["shared_block"] if cfg.share_layers else ["block0", "block1"]
    head = np.arange(HEAD, 2 * HEAD)  # head 1
    neurons = [5, 17, 30]
    projections = ["query", "key_value"] if cfg.shared_kv else ["query", "key", "value"]
    for name in projections:
        _zero(model, f"{blocks[0]}_{name}", cols=head)
    _zero(model, f"{blocks[0]}_attention_output", rows=head)
    _zero(model, f"{blocks[-1]}_ffn_inner", cols=neurons)
    _zero(model, f"{blocks[-1]}_ffn_output", rows=neurons)
    keep_heads = {b: np.arange(4) for b in blocks}
    keep_heads[blocks[0]] = np.array([0, 2, 3])
    keep_neurons = {b: np.arange(48) for b in blocks}
    keep_neurons[blocks[-1]] = np.array([j for j in range(48) if j not in neurons])
    small, small_cfg = prune_units(model, cfg, keep_heads, keep_neurons)

    x = _inputs()
    assert max_abs_diff([np.asarray(model(x))], [np.asarray(small(x))]) <= 1e-5
    # q/k/v columns + biases and attention-output rows of one head; FFN column, bias, row.
    per_head = len(projections) * (32 * HEAD + HEAD) + HEAD * 32
    per_neuron = 32 + 1 + 32
    assert model.count_params() - small.count_params() == per_head + len(neurons) * per_neuron
    assert small_cfg.layer_heads[0] == 3 and small_cfg.layer_ffn_dims[-1] == 45
    assert type(small).__module__.split(".")[0] == type(model).__module__.split(".")[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_full_rank_svd_reproduces_the_model(engine):
    keras = get_keras(engine)
    cfg = _cfg()
    model = _model(keras, cfg)
    full, full_cfg = factorize(model, cfg, layers=["*"], rank_fraction=1.0, full_rank_ok=True)
    x = _inputs()
    assert max_abs_diff([np.asarray(model(x))], [np.asarray(full(x))]) <= 1e-5
    assert len(full_cfg.low_rank) == 12  # 6 projections x 2 blocks
    half, half_cfg = factorize(model, cfg, layers=["*_ffn_*"], rank_fraction=0.5)
    ranks = dict(e.split(":") for e in half_cfg.low_rank)
    assert ranks == {"block0_ffn_inner": "16", "block0_ffn_output": "16",
                     "block1_ffn_inner": "16", "block1_ffn_output": "16"}  # min(32, 48) / 2
    assert half.count_params() < model.count_params()
    kernel = np.asarray(model.get_layer("block0_ffn_inner").kernel, np.float64)
    singular = np.linalg.svd(kernel, compute_uv=False)
    power = np.cumsum(singular ** 2) / np.sum(singular ** 2)
    _, energy_cfg = factorize(model, cfg, layers=["block0_ffn_inner"], energy=0.9,
                              full_rank_ok=True)
    assert energy_cfg.low_rank == [f"block0_ffn_inner:{int(np.argmax(power >= 0.9)) + 1}"]


def test_scores_are_reproducible_and_selection_keeps_a_unit_per_layer():
    keras = get_keras("keras3")
    cfg = _cfg()
    model = _model(keras, cfg)
    for method in ("magnitude", "taylor"):
        a = unit_scores(model, cfg, method, _batches(), batches=3)
        b = unit_scores(model, cfg, method, _batches(), batches=3)
        for kind in ("heads", "neurons"):
            for block in a[kind]:
                np.testing.assert_array_equal(a[kind][block], b[kind][block])
    scores = {"block0": np.array([1.0, 2.0, 3.0, 4.0]), "block1": np.array([10.0, 0.1, 0.2, 0.3])}
    assert {k: v.tolist() for k, v in select_units(scores, 0.5).items()} == {
        "block0": [2, 3], "block1": [0, 3]}
    glob = select_units(scores, 0.75, scope="global")  # 6 of 8 go, 1 stays per layer
    assert sum(len(v) for v in glob.values()) == 2 and all(len(v) == 1 for v in glob.values())
    with pytest.raises(ValueError, match=r"`fraction` must be in \[0, 1\)"):
        select_units(scores, 1.0)
    # Gradual rounds compute fractions like 1 - 0.5 / (2 / 3) = 0.25000000000000006: a
    # half unit is not removed because of float noise.
    assert [len(v) for v in select_units(
        {"b": np.arange(2.0)}, 1 - 0.5 / (1 - 1 / 3)).values()] == [2]
    ties = select_units({"block0": np.ones(4), "block1": np.ones(4)}, 0.5, scope="global")
    assert {k: v.tolist() for k, v in ties.items()} == {"block0": [0, 1, 2],
                                                        "block1": [0]}  # later layer first
    assert {k: v.tolist() for k, v in select_units(scores, keep={"block0": 1, "block1": 3}
                                                   ).items()} == {"block0": [3],
                                                                  "block1": [0, 2, 3]}


def test_both_engines_give_the_same_compact_model_from_the_same_weights():
    cfg = _cfg()
    k3, tk = get_keras("keras3"), get_keras("tf_keras")
    a = _model(k3, cfg)
    b = _model(tk, cfg)
    b.set_weights(a.get_weights())
    small_a, cfg_a = prune_heads(a, cfg, 0.5, 0.5, "taylor", _batches(), batches=3)
    small_b, cfg_b = prune_heads(b, cfg, 0.5, 0.5, "taylor", _batches(), batches=3)
    assert (cfg_a.layer_heads, cfg_a.layer_ffn_dims) == (cfg_b.layer_heads, cfg_b.layer_ffn_dims)
    assert cfg_a.layer_heads == [2, 2] and cfg_a.layer_ffn_dims == [24, 24]
    assert max_abs_diff(small_a, small_b) == 0.0  # the same units were kept
    x = _inputs()
    assert max_abs_diff([np.asarray(small_a(x))], [np.asarray(small_b(x))]) <= 1e-5
    assert analytic_flops(small_a, cfg_a, SEQ) < 0.6 * analytic_flops(a, cfg, SEQ)


@pytest.mark.parametrize("engine", ENGINES)
def test_compact_factorized_model_round_trips(engine, tmp_path):
    keras = get_keras(engine)
    cfg = _cfg()
    small, small_cfg = prune_heads(_model(keras, cfg), cfg, 0.25, 0.5, "magnitude")
    small, small_cfg = factorize(small, small_cfg, layers=["*_query", "*_ffn_inner"], rank=6)
    rebuilt = build_transformer_classifier(small_cfg, VOCAB, CLASSES, SEQ, keras=keras)
    rebuilt.set_weights(small.get_weights())  # the config alone describes the model
    assert round_trip_in_fresh_process(small, _inputs(), tmp_path, engine, atol=1e-5) == (
        "Functional")


def test_config_errors():
    with pytest.raises(ConfigError, match="Set only one of"):
        load_config(None, ["compression.low_rank.rank=4", "compression.low_rank.energy=0.9"])
    with pytest.raises(ConfigError, match="must hold 2 value"):
        load_config(None, ["model.layer_heads=[2]"])
    with pytest.raises(ConfigError, match="'layer_name:rank'"):
        load_config(None, ["model.low_rank=[block0_query]"])
    with pytest.raises(ConfigError, match="projection layers"):
        load_config(None, ["model.low_rank=[logits:4]"])
    with pytest.raises(ValueError, match="names layers the model does not have"):
        build_transformer_classifier(_cfg(low_rank=["block9_query:4"]), VOCAB, CLASSES, SEQ)
    with pytest.raises(ConfigError, match="fine_tune_epochs"):
        load_config(None, ["compression.structured.heads_fraction=0.5",
                           "compression.structured.iterations=3",
                           "compression.fine_tune_epochs=2"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tf_effitrain.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_compress_cli_writes_a_compact_run(finished_run, tmp_path):
    """Gradual head/neuron removal + FFN factorization + distillation from the
    uncompressed run, then export: one new run directory with the comparison."""
    source = finished_run[1].run_dir
    out = str(tmp_path / "compact")
    sets = ["compression.structured.heads_fraction=0.5",
            "compression.structured.neurons_fraction=0.5",
            "compression.structured.iterations=2", "compression.low_rank.rank_fraction=0.25",
            "compression.fine_tune_epochs=2", "compression.distill=true",
            "compression.tflite_latency=false",
            "export.quantize=[dynamic]", "export.delegates=[none]"]
    done = _cli("compress", source, "--run-dir", out, *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "compression.json")))
    assert summary["before"]["heads"] == [2] and summary["after"]["heads"] == [1]
    assert summary["after"]["ffn_dims"] == [32]
    assert summary["after"]["low_rank"] == ["block0_ffn_inner:8", "block0_ffn_output:8"]
    assert summary["after"]["params"] < summary["before"]["params"]
    assert summary["after"]["flops"] < summary["before"]["flops"]
    assert set(summary["latency_ms"]["after"]) == {"1", "32"}
    assert os.path.isfile(os.path.join(out, "stage1", "model.keras"))  # gradual: 2 rounds
    config = load_config(os.path.join(out, "config.yaml"))
    assert config.model.layer_heads == [1] and not config.compression.enabled
    keras = get_keras("keras3")
    model = keras.models.load_model(os.path.join(out, "model.keras"), compile=False)
    assert model.count_params() == summary["after"]["params"]
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "## Compression" in report and "CPU latency, batch 32" in report
    assert "## Distillation" in report  # the uncompressed run taught the compact one
    assert json.load(open(os.path.join(out, "export_report.json")))["files"]

    done = _cli("compress", source, "--run-dir", str(tmp_path / "none"))
    assert done.returncode == 2 and "Nothing to compress" in done.stderr
    assert not os.path.exists(tmp_path / "none")


def test_train_with_a_compression_section(small_jsonl, tmp_path):
    from tf_effitrain.training import train

    config = tiny_config(small_jsonl, str(tmp_path / "run"), "training.epochs=1",
                         "compression.structured.neurons_fraction=0.5",
                         "compression.structured.method=magnitude",
                         "compression.fine_tune_epochs=1")
    result = train(config)
    compact = load_config(str(tmp_path / "run_compressed" / "config.yaml"))
    assert compact.model.layer_ffn_dims == [32] and compact.model.layer_heads == [2]
    report = open(result.report_path, encoding="utf-8").read()
    assert "Compressed run:" in report
    compact_report = open(tmp_path / "run_compressed" / "report.md", encoding="utf-8").read()
    assert "TFLite float32 latency, batch 1" in compact_report  # the deployed form
