"""tfmot pruning (unstructured and 2:4) and quantization-aware training on the builder's
tf_keras Transformer: exact sparsity, 2:4 groups in attention kernels, replicas under
MirroredStrategy with accumulation, mixed precision, strip, QAT to int8 TFLite, the
`compression.pruning` / `compression.qat` sections, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from harness import REPO, round_trip_in_fresh_process, tiny_config
from tf_effitrain.config import ConfigError, ModelConfig, load_config
from tf_effitrain.engine import get_keras
from tf_effitrain.models import build_transformer_classifier

VOCAB, CLASSES, SEQ = 80, 3, 16
ATTENTION = ("query", "key", "value", "attention_output")


def _cfg(**options):
    return ModelConfig(num_layers=2, d_model=32, num_heads=2, ffn_dim=64, dropout=0.0,
                       **options)


def _model(seed=0, **options):
    keras = get_keras("tf_keras")
    keras.utils.set_random_seed(seed)
    return build_transformer_classifier(_cfg(**options), VOCAB, CLASSES, SEQ, keras=keras)


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randint(1, VOCAB, size=(n, SEQ)).astype("int32")
    x[::2, 10:] = 0
    return x, rng.randint(0, CLASSES, n).astype("int32")


def _fit(model, k=1, epochs=1, batch=16, strategy=None, optimizer=None):
    """Compiles `et.accumulate(model, k)` (in `strategy`'s scope) and fits it."""
    from tf_effitrain.training.accumulation import accumulate

    keras = get_keras("tf_keras")
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        trainable = accumulate(model, k)
        trainable.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    history = trainable.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return trainable, history


def _kernels(model, roles=None):
    """`{layer name: kernel array}` of the encoder's Dense layers (optionally by role)."""
    out = {}
    for layer in model.layers:
        if layer.name.startswith("block") and type(layer).__name__ == "Dense":
            if roles is None or layer.name.split("_", 1)[1] in roles:
                out[layer.name] = layer.kernel.numpy()
    return out


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_every_pruned_kernel_reaches_the_target_within_one_element(target):
    from tf_effitrain.compress import prune, sparsity_table, strip

    pruned, callbacks = prune(_model(), target, "constant", frequency=1, embedding=True)
    assert callbacks and type(callbacks[0]).__name__ == "UpdatePruningStep"
    trainable, _ = _fit(pruned)
    final = strip(trainable)  # through the accumulator
    table = sparsity_table(final)
    pruned_rows = [r for r in table if r["layer"] != "logits"]
    # 2 blocks x 6 Dense + the embedding table; the classifier head is left alone.
    assert len(pruned_rows) == 13
    for r in pruned_rows:
        assert abs(r["zeros"] - target * r["size"]) <= 1, r
    assert [r["zeros"] for r in table if r["layer"] == "logits"] == [0]


def test_two_four_sparsity_in_every_group_including_attention():
    from tf_effitrain.compress import prune, strip

    pruned, _ = prune(_model(), m_by_n=(2, 4), frequency=1)
    trainable, _ = _fit(pruned)
    kernels = _kernels(strip(trainable))
    assert {name.split("_", 1)[1] for name in kernels} >= set(ATTENTION)
    for name, kernel in kernels.items():
        # Groups of 4 consecutive input weights of each output unit.
        groups = kernel.T.reshape(-1, 4)
        zeros = np.sum(groups == 0, axis=1)
        assert np.all(zeros >= 2), (name, np.bincount(zeros))
        assert abs(np.mean(kernel == 0) - 0.5) < 1e-9, name


def test_masks_identical_across_replicas_with_accumulation(mirrored):
    """MirroredStrategy, accumulation k=2: tfmot's mask update (`merge_call`) runs once
    per update outside the micro-batch loop; masks equal on both replicas, the schedule
    counted in updates (4 batches = 4 updates, not 8 micro-batches)."""
    from tf_effitrain.compress import prune, pruning_wrappers, strip

    with mirrored.scope():
        pruned, _ = prune(_model(), 0.8, "polynomial", 0, 4, frequency=1)
    trainable, history = _fit(pruned, k=2, strategy=mirrored)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(trainable.optimizer.iterations.numpy()) == 4
    wrappers = pruning_wrappers(trainable)
    assert len(wrappers) == 12
    for wrapper in wrappers:
        assert {int(v.numpy()) for v in wrapper.pruning_step.values} == {4}
        for _, mask, _ in wrapper.pruning_vars:
            first, second = (np.asarray(v.numpy()) for v in mask.values)
            np.testing.assert_array_equal(first, second)
            assert abs(np.mean(first == 0) - 0.8) < 1e-3
    for name, kernel in _kernels(strip(trainable)).items():
        assert abs(np.mean(kernel == 0) - 0.8) < 1e-3, name


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_pruned_model_trains_under_mixed_precision(policy):
    """Embedding included (tfmot alone fails: float32 table x low-precision mask); the
    masking does not round the float32 master weights to the compute dtype: with a zero
    learning rate every kept weight stays exactly its float32 initial value (tfmot's
    masking inside the autocast scope rounds them all)."""
    from tf_effitrain.compress import prune, strip
    from tf_effitrain.training.trainer import precision_policy

    keras = get_keras("tf_keras")
    with precision_policy(keras, policy):
        model = _model()
        initial = {**_kernels(model),
                   "token_embedding": model.get_layer("token_embedding").embeddings.numpy()}
        pruned, _ = prune(model, 0.5, "constant", frequency=1, embedding=True)
        trainable, _ = _fit(pruned, optimizer=keras.optimizers.SGD(0.0))
        final = strip(trainable)
        moved, history = _fit(prune(_model(), 0.5, "constant", frequency=1,
                                    embedding=True)[0], epochs=2)
    assert np.all(np.isfinite(history.history["loss"]))
    final_kernels = {**_kernels(final),
                     "token_embedding": final.get_layer("token_embedding").embeddings.numpy()}
    for name, kernel in final_kernels.items():
        assert kernel.dtype == np.float32
        assert abs(np.mean(kernel == 0) - 0.5) < 1e-3, name
        kept = kernel != 0
        np.testing.assert_array_equal(kernel[kept], initial[name][kept], err_msg=name)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(
        _kernels(strip(moved)).values(), _kernels(_model()).values())) > 1e-3


def test_qat_trains_under_mirrored_with_accumulation(mirrored):
    """tfmot's activation ranges update through `merge_call`: inside the micro-batch
    loop the QAT wrappers run without updating them (once per update, outside)."""
    from tf_effitrain.compress import quantize_aware

    with mirrored.scope():
        qat = quantize_aware(_model())
    trainable, history = _fit(qat, k=2, strategy=mirrored)
    assert np.all(np.isfinite(history.history["loss"]))
    ranges = [v for v in qat.variables if v.name.endswith("post_activation_max:0")]
    assert ranges
    for v in ranges:
        first, second = (np.asarray(r.numpy()) for r in v.values)
        np.testing.assert_array_equal(first, second)


def test_strip_leaves_no_wrapper_and_the_same_outputs(tmp_path):
    from tf_effitrain.compress import prune, strip

    pruned, _ = prune(_model(), 0.5, "constant", frequency=1)
    trainable, _ = _fit(pruned)
    x, _ = _data(8, seed=3)
    wrapped = np.asarray(trainable.model(x, training=False))
    final = strip(trainable)
    assert not [layer for layer in final.layers if "prune" in type(layer).__name__.lower()]
    np.testing.assert_allclose(np.asarray(final(x, training=False)), wrapped, atol=1e-6)
    # The stripped model is a plain builder model: it saves and loads anywhere.
    assert round_trip_in_fresh_process(final, x, tmp_path, engine="tf_keras") == "Functional"


def test_low_rank_layers_are_pruned_in_both_factors():
    from tf_effitrain.compress import prune, sparsity_table, strip

    model = _model(low_rank=["block0_ffn_inner:4"])
    pruned, _ = prune(model, 0.5, "constant", frequency=1, layers=["block0_ffn_inner"])
    trainable, _ = _fit(pruned)
    rows = sparsity_table(strip(trainable))
    assert {(r["layer"], r["weight"]): r["sparsity"] for r in rows
            if r["sparsity"]} == {("block0_ffn_inner", "kernel_a"): 0.5,
                                  ("block0_ffn_inner", "kernel_b"): 0.5}


def test_qat_model_converts_to_int8_and_runs(tmp_path):
    from tf_effitrain.compress import quantize_aware
    from tf_effitrain.export.tflite import export_tflite
    from tf_effitrain.export.verify import run_tflite

    qat = quantize_aware(_model())
    wrapped = [layer.name for layer in qat.layers if type(layer).__name__ == "QuantizeWrapperV2"]
    assert len(wrapped) == 13  # 12 encoder Dense + the head; no embedding, norm, core
    trainable, _ = _fit(qat)
    x, _ = _data(16, seed=4)
    path = str(tmp_path / "qat.tflite")
    audit = export_tflite(qat, path, "int8", representative_data=x, sequence_length=SEQ)
    assert "FULLY_CONNECTED" in audit.ops and set(audit.float_ops) <= {"CAST"}
    logits, _ = run_tflite(path, x, "none")
    reference = np.asarray(qat(x, training=False))
    assert logits.shape == reference.shape
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) >= 0.8


def test_pruning_preserving_qat_keeps_the_zeros():
    from tf_effitrain.compress import prune, quantize_aware, strip

    pruned, _ = prune(_model(), 0.8, "constant", frequency=1)
    trainable, _ = _fit(pruned)
    sparse = strip(trainable)
    qat = quantize_aware(sparse)  # detects the zeros: pruning-preserving scheme
    _fit(qat, epochs=2)
    for layer in qat.layers:
        if layer.name.startswith("quant_block"):
            # The wrapped layer's `kernel` attribute is the fake-quant tensor now.
            kernel = next(v for v in layer.weights if v.name.endswith("/kernel:0")).numpy()
            assert np.mean(kernel == 0) >= 0.8 - 1e-3, layer.name


def test_clear_errors():
    from tf_effitrain.compress import prune, quantize_aware
    from tf_effitrain.training.accumulation import accumulate

    keras3 = get_keras("keras3")
    model3 = build_transformer_classifier(_cfg(), VOCAB, CLASSES, SEQ, keras=keras3)
    with pytest.raises(ValueError, match="tf_keras model.*compression.pruning"):
        prune(model3, 0.5, "constant")
    with pytest.raises(ValueError, match="QAT|Quantization-aware training needs"):
        quantize_aware(model3)
    with pytest.raises(ValueError, match="Prune the model, then wrap it"):
        prune(accumulate(_model(), 2), 0.5, "constant")
    with pytest.raises(ValueError, match=r"match no prunable layer.*block0_query"):
        prune(_model(), 0.5, "constant", layers=["encoder_*"])
    with pytest.raises(ValueError, match="end_step"):
        prune(_model(), 0.5, "polynomial")
    with pytest.raises(ValueError, match=r"`target_sparsity` must be a number in \[0.0, 1.0\)"):
        prune(_model(), 1.0, "constant")
    pruned, _ = prune(_model(), 0.5, "constant")
    with pytest.raises(ValueError, match="Strip the pruning wrappers first"):
        quantize_aware(pruned)
    with pytest.raises(ConfigError, match="keras-hub backbone is Keras 3"):
        load_config(None, ["model.kind=bert_backbone", "compression.pruning.target_sparsity=0.5"])
    with pytest.raises(ConfigError, match="either `compression.pruning.target_sparsity`"):
        load_config(None, ["compression.pruning.target_sparsity=0.5",
                           "compression.pruning.m_by_n=[2, 4]"])
    with pytest.raises(ConfigError, match=r"m_by_n` must be \[m, n\]"):
        load_config(None, ["compression.pruning.m_by_n=[4, 2]"])
    with pytest.raises(ConfigError, match="compression.pruning.target_sparsity"):
        load_config(None, ["compression.pruning.target_sparsty=0.5"])
    with pytest.raises(ValueError, match="`begin_step` must be 0 with `m_by_n`"):
        prune(_model(), m_by_n=(2, 4), begin_step=5)
    with pytest.raises(ConfigError, match="`begin_step` must be 0"):
        load_config(None, ["compression.pruning.m_by_n=[2, 4]", "compression.pruning.begin_step=3"])
    with pytest.raises(ValueError, match=r"called more than once per forward pass.*shared_block"):
        prune(_model(share_layers=True), 0.5, "constant", layers=["shared_block*"])
    with pytest.raises(ConfigError, match="cannot prune `model.share_layers: true`"):
        load_config(None, ["model.share_layers=true", "compression.pruning.target_sparsity=0.5"])


def test_aligned_schedule_reaches_the_target_inside_the_run():
    from tf_effitrain.compress.tfmot_plugins import aligned_schedule

    # 10 updates, target at 70%: masks every 3 updates, the last at update 6.
    assert aligned_schedule(0, None, 0.7, 10, 10) == (6, 3)
    assert aligned_schedule(0, 700, 0.7, 10, 1000) == (700, 10)
    assert aligned_schedule(5, 12, 0.7, 10, 100) == (11, 3)
    assert aligned_schedule(0, None, 0.7, 100, 8, constant=True) == (None, 4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tf_effitrain.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_compress_cli_prunes_and_quantizes_a_keras3_run(finished_run, tmp_path):
    """`tf-effitrain compress` on a Keras 3 run: weights copied into the tf_keras twin,
    pruned to 25% (embedding too) while fine-tuning, then pruning-preserving QAT (the
    Dense zeros kept by tfmot's scheme, the embedding's by freezing it) and an int8
    file; the run's test accuracy is the saved float model's."""
    source = finished_run[1].run_dir
    out = str(tmp_path / "pruned")
    sets = ["compression.pruning.target_sparsity=0.25", "compression.pruning.embedding=true",
            "compression.qat=true", "compression.fine_tune_epochs=2",
            "compression.tflite_latency=false"]
    bad = _cli("compress", source, "--run-dir", out, "--set",
               "compression.pruning.target_sparsity=0.5", "--set",
               "compression.pruning.layers=[encoder_*]")
    assert bad.returncode == 2 and "pattern 'encoder_*' matches no prunable layer" in bad.stderr
    assert not os.path.exists(out)
    done = _cli("compress", source, "--run-dir", out, *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tfmot supports tf_keras only" in done.stdout + done.stderr
    summary = json.load(open(os.path.join(out, "compression.json")))
    assert summary["int8"]["file"] == "model_int8.tflite"
    assert 0.0 <= summary["int8"]["tflite_accuracy"] <= 1.0
    assert {r["layer"] for r in summary["sparsity"]} >= {"token_embedding", "block0_query"}
    assert all(abs(r["sparsity"] - 0.25) < 1e-3 for r in summary["sparsity"]), summary["sparsity"]
    config = load_config(os.path.join(out, "config.yaml"))
    assert config.runtime.engine == "tf_keras" and not config.compression.enabled
    model = get_keras("tf_keras").models.load_model(os.path.join(out, "model.keras"),
                                                    compile=False)
    for name, kernel in _kernels(model).items():
        assert abs(np.mean(kernel == 0) - 0.25) < 1e-3, name
    from tf_effitrain.training import evaluate_run

    run = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    test = [r for r in run if r.get("split") == "test"][-1]
    saved = evaluate_run(out)["accuracy"]  # the saved model.keras on the test split
    assert abs(test["accuracy"] - saved) < 1e-6
    assert abs(summary["int8"]["float_accuracy"] - saved) < 1e-6
    assert 0.0 <= summary["int8"]["qat_accuracy"] <= 1.0
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "## Quantization-aware training" in report and "Sparsity kept through QAT" in report
    stage1 = open(os.path.join(out, "stage1", "report.md"), encoding="utf-8").read()
    assert "## Pruning" in stage1 and "block0_query" in stage1

    # QAT alone on a run pruned earlier (the pruning stage's run): its zeros are kept.
    from tf_effitrain.compress import compress_run

    qat_out = str(tmp_path / "qat_of_pruned")
    compress_run(os.path.join(out, "stage1"), load_config(
        os.path.join(out, "stage1", "config.yaml"),
        ["compression.qat=true", "compression.tflite_latency=false"]), out_dir=qat_out,
        log=lambda line: None)
    model = get_keras("tf_keras").models.load_model(os.path.join(qat_out, "model.keras"),
                                                    compile=False)
    for name, kernel in _kernels(model).items():
        assert abs(np.mean(kernel == 0) - 0.25) < 1e-3, name
    embedding = model.get_layer("token_embedding").embeddings.numpy()
    assert abs(np.mean(embedding == 0) - 0.25) < 1e-3
    report = open(os.path.join(qat_out, "report.md"), encoding="utf-8").read()
    assert "Sparsity kept through QAT" in report and "token_embedding" in report


def test_train_with_a_pruning_section_writes_the_pruned_run(small_jsonl, tmp_path):
    """`train` with `compression.pruning` (2:4): the trained run, then its pruned copy."""
    from tf_effitrain.training import train

    config = tiny_config(small_jsonl, str(tmp_path / "run"), "training.epochs=1",
                         "compression.pruning.m_by_n=[2, 4]", "compression.fine_tune_epochs=1",
                         "compression.tflite_latency=false")
    result = train(config)
    out = str(tmp_path / "run_compressed")
    assert f"Compressed run: [{out}]" in open(os.path.join(result.run_dir, "report.md")).read()
    model = get_keras("tf_keras").models.load_model(os.path.join(out, "model.keras"),
                                                    compile=False)
    for name, kernel in _kernels(model).items():
        assert np.all(np.sum(kernel.T.reshape(-1, 4) == 0, axis=1) >= 2), name


def test_bench_pruning_tables_and_overhead(tmp_path):
    """`bench pruning`'s table and plot from a result of its schema; the overhead timer
    on a tiny model (the figures themselves are in docs/benchmarks.md)."""
    from tf_effitrain.bench.pruning import format_pruning, plot_pruning, pruning_overhead

    def s(mean, std=0.01):
        return {"mean": mean, "std": std}

    level = {"accuracy": s(0.75), "retained": s(1.0), "sparsity": s(0.8),
             "int8_accuracy": None, "int8_retained": None, "int8_gzip_bytes": None,
             "int8_vs_float32_gzip": None, "seconds": s(30.0)}
    result = {"cpu": "test", "seeds": [0, 1], "fine_tune_epochs": 3,
              "base_accuracy": s(0.75), "float32_tflite": {"bytes": 1000, "gzip_bytes": 900},
              "summary": {"prune 80%": level,
                          "qat int8": {**level, "sparsity": None, "int8_accuracy": s(0.74),
                                       "int8_retained": s(0.99),
                                       "int8_gzip_bytes": s(90.0),
                                       "int8_vs_float32_gzip": s(0.09)}},
              "overhead": {"plain": 0.02, "pruned": 0.025, "ratio": 1.25}}
    table = format_pruning(result)
    assert "| prune 80% | 0.7500 ± 0.0100 | 100.0% ± 1.0% | 80.0% | - |" in table
    assert "| qat int8 |" in table and "0.090x" in table and "1.25x" in table
    assert os.path.getsize(plot_pruning(result, str(tmp_path / "p.png"))) > 0
    timed = pruning_overhead(_cfg(), vocab_size=VOCAB, max_length=SEQ, batch=8, steps=2,
                             rounds=1)
    assert set(timed) == {"plain", "pruned", "ratio"} and timed["ratio"] > 0
