"""Runtime: precision and strategy choices, TPU readiness, training under MirroredStrategy."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import load_config
from tf_effitrain.engine import get_keras
from tf_effitrain.runtime import (
    Hardware,
    StrategyError,
    check_tpu_readiness,
    choose_precision,
    choose_strategy,
    cpu_flags,
    detect_hardware,
    is_chief,
    resolve_strategy,
    set_precision,
    tpu_evidence,
)

from cluster import run_cluster

CPU = Hardware()
CPU_BF16 = Hardware(cpu_flags=frozenset({"avx512f", "avx512_bf16"}))
CPU_AMX = Hardware(cpu_flags=frozenset({"amx_bf16", "amx_tile"}))


# ---- precision ------------------------------------------------------------------------

@pytest.mark.parametrize("hardware, policy, reason", [
    (Hardware(tpu_cores=8), "mixed_bfloat16", "TPU"),
    (Hardware(gpu_compute_capabilities=((8, 0), (8, 6))), "mixed_bfloat16", "8.0 >= 8.0"),
    (Hardware(gpu_compute_capabilities=((7, 5),)), "mixed_float16", "loss scaling"),
    (Hardware(gpu_compute_capabilities=((8, 0), (7, 0))), "mixed_float16", "7.0 < 8.0"),
    (Hardware(gpu_compute_capabilities=((6, 1),)), "float32", "6.1 < 7.0"),
    (CPU_BF16, "mixed_bfloat16", "avx512_bf16"),
    (CPU_AMX, "mixed_bfloat16", "amx_bf16"),
    (CPU, "float32", "no TPU, GPU or bfloat16-capable CPU"),
])
def test_auto_precision_follows_the_hardware(hardware, policy, reason):
    chosen, why = choose_precision("auto", hardware)
    assert chosen == policy and reason in why


@pytest.mark.parametrize("d_model, policy", [(128, "float32"), (256, "mixed_bfloat16")])
def test_auto_precision_on_a_bf16_cpu_follows_the_models_width(d_model, policy):
    from tf_effitrain.config import ModelConfig

    chosen, why = choose_precision("auto", CPU_BF16, ModelConfig(d_model=d_model))
    assert chosen == policy and "avx512_bf16" in why
    if policy == "float32":
        assert "d_model 128 < 256" in why
    # An accelerator decides alone: the width rule is the CPU's.
    assert choose_precision("auto", Hardware(tpu_cores=8), ModelConfig(d_model=64))[0] == (
        "mixed_bfloat16")


def test_requested_precision_is_kept_and_validated():
    assert choose_precision("mixed_float16", CPU_BF16) == ("mixed_float16", "requested")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        choose_precision("fp8", CPU)


def test_this_machine_is_described_from_its_cpu_flags():
    hardware = detect_hardware()
    assert hardware.cpu_bf16 == bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert hardware.num_gpus == len(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize("engine", ["keras3", "tf_keras"])
def test_set_precision_sets_the_engine_policy_and_logs_why(engine):
    keras = get_keras(engine)
    lines = []
    assert set_precision("auto", keras, hardware=CPU_AMX, log=lines.append)[0] == (
        "mixed_bfloat16")
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert lines == ["precision: mixed_bfloat16 (CPU computes bfloat16 natively (amx_bf16))"]


# ---- strategy -------------------------------------------------------------------------

CLUSTER = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
           "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("hardware, tf_config, kind", [
    (CPU, CLUSTER, "multi_worker"),
    (Hardware(tpu_cores=8), {}, "tpu"),
    (Hardware(tpu_cores=8), CLUSTER, "multi_worker"),
    (Hardware(gpu_compute_capabilities=((8, 0), (8, 0))), {}, "mirrored"),
    (Hardware(gpu_compute_capabilities=((7, 5),)), {}, "one_device"),
    (CPU, {}, "default"),
    (CPU, {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}},
     "default"),
])
def test_auto_strategy_follows_hardware_and_cluster(hardware, tf_config, kind):
    assert choose_strategy("auto", hardware, tf_config)[0] == kind
    assert choose_strategy("mirrored", hardware, tf_config) == ("mirrored", "requested")


def test_tpu_evidence_comes_from_environment_and_devices():
    assert tpu_evidence({}, devices=[]) == []
    assert tpu_evidence({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, devices=[]) == ["COLAB_TPU_ADDR"]
    assert tpu_evidence({}, devices=["/dev/accel0"]) == ["/dev/accel0"]


@pytest.mark.parametrize("tf_config, chief", [
    ({}, True),
    (CLUSTER, False),
    ({**CLUSTER, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"chief": ["h:1"], "worker": ["h:2"]}, "task": {"type": "worker", "index": 0}},
     False),
    ({"cluster": {"chief": ["h:1"], "worker": ["h:2"]}, "task": {"type": "chief", "index": 0}},
     True),
])
def test_only_the_chief_writes(tf_config, chief):
    assert is_chief(tf_config) is chief


def test_resolve_strategy_builds_the_requested_kind():
    lines = []
    assert resolve_strategy("default", log=lines.append, environ={}) is (
        tf.distribute.get_strategy())
    assert lines == ["strategy: default x1 (requested)"]
    assert isinstance(resolve_strategy("one_device", log=None, environ={}),
                      tf.distribute.OneDeviceStrategy)
    assert isinstance(resolve_strategy("mirrored", log=None, environ={}),
                      tf.distribute.MirroredStrategy)
    auto = resolve_strategy("auto", log=lines.append, environ={})
    assert auto.num_replicas_in_sync == 1 and "no accelerator" in lines[-1]


def test_tpu_requested_without_a_tpu_fails_fast_with_a_clear_error():
    with pytest.raises(StrategyError, match="no TPU is attached"):
        resolve_strategy("tpu", log=None, environ={})
    with pytest.raises(StrategyError, match="TF_CONFIG is not valid JSON"):
        resolve_strategy("auto", log=None, environ={"TF_CONFIG": "{oops"})


def test_a_tpu_that_cannot_be_reached_is_a_loud_error(monkeypatch):
    """With TPU evidence, `auto` never falls back to the CPU silently."""
    from tf_effitrain.runtime import distribute

    def refuse(address):
        raise StrategyError("Could not connect to a TPU: TPUClusterResolver({}): "
                            "Failed to connect to all addresses")

    monkeypatch.setattr(distribute, "_connect_tpu", refuse)
    lines = []
    with pytest.raises(StrategyError) as info:
        resolve_strategy("auto", log=lines.append,
                         environ={"COLAB_TPU_ADDR": "10.0.0.2:8470"})
    message = str(info.value)
    assert "A TPU is attached (COLAB_TPU_ADDR" in message
    assert "Failed to connect to all addresses" in message
    assert "Restart session" in message and "`runtime.strategy: default`" in message
    assert "\n" not in message and lines == []  # one line; nothing was chosen


# ---- TPU readiness --------------------------------------------------------------------

def _ids_dataset(dtype=tf.int32, batch=4, length=8, drop=True):
    ids = tf.cast(tf.ones([16, length], tf.int32), dtype)
    return tf.data.Dataset.from_tensor_slices((ids, tf.zeros([16], tf.int32))).batch(
        batch, drop_remainder=drop)


def _tpu_config(*overrides):
    return load_config(None, ["data.batching=fixed", "data.drop_remainder=true", *overrides])


def test_a_ready_config_and_pipeline_pass():
    assert check_tpu_readiness(_tpu_config(), _ids_dataset(), environ={}) == []


@pytest.mark.parametrize("config, dataset, environ, message", [
    (["data.batching=bucket"], None, {}, "Set `data.batching: pack`"),
    (["data.drop_remainder=false"], None, {}, "Set `data.drop_remainder: true`"),
    ([], "dynamic", {}, "unknown dimensions"),
    ([], "int64", {}, "TPUs take int32 inputs"),
    ([], "py_function", {}, "cannot run on a TPU host"),
    ([], "local_files", {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "Copy them to Cloud Storage"),
])
def test_each_planted_tpu_problem_is_flagged(config, dataset, environ, message, tmp_path):
    if dataset == "dynamic":
        dataset = _ids_dataset(drop=False)
    elif dataset == "int64":
        dataset = _ids_dataset(tf.int64)
    elif dataset == "py_function":
        def slow(ids, y):  # shape restored: only the Python call is the problem
            return tf.ensure_shape(tf.py_function(lambda t: t, [ids], tf.int32),
                                   ids.shape), y
        dataset = _ids_dataset().map(slow)
    elif dataset == "local_files":
        path = str(tmp_path / "d.tfrecord")
        dataset = tf.data.TFRecordDataset([path]).map(
            lambda r: (tf.zeros([8], tf.int32), 0)).batch(4, drop_remainder=True)
    problems = check_tpu_readiness(_tpu_config(*config), dataset, environ=environ)
    assert len(problems) == 1 and message in problems[0], problems


def test_local_files_are_fine_on_a_tpu_vm(tmp_path):
    dataset = tf.data.TFRecordDataset([str(tmp_path / "d.tfrecord")]).map(
        lambda r: (tf.zeros([8], tf.int32), 0)).batch(4, drop_remainder=True)
    assert check_tpu_readiness(_tpu_config(), dataset, environ={}) == []


def test_cli_check_tpu(capsys, small_jsonl):
    from tf_effitrain.cli import main

    base = ["--set", f"data.path={small_jsonl}", "--set", "data.vocab_size=200",
            "--set", "data.batch_size=8"]
    assert main(["check", "--tpu", "configs/colab_tpu.yaml", *base]) == 0
    assert "ready for TPUStrategy" in capsys.readouterr().out
    assert main(["check", "--tpu", "configs/demo_cpu.yaml", *base]) == 0  # packed rows
    capsys.readouterr()
    assert main(["check", "--tpu", "configs/demo_cpu.yaml", *base,
                 "--set", "data.batching=bucket"]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and "data.batching" in out and "drop_remainder" in out


# ---- training under MirroredStrategy ---------------------------------------------------

def _train_weights(small_jsonl, tmp_path, name, strategy, batch_size, *extra):
    from tf_effitrain.training import train

    config = load_config(None, [
        f"data.path={small_jsonl}", f"training.run_dir={tmp_path / name}",
        "data.vocab_size=200", "data.max_length=24", f"data.batch_size={batch_size}",
        "model.num_layers=1", "model.d_model=16", "model.num_heads=2", "model.ffn_dim=32",
        "model.dropout=0.0", "model.shared_kv=true", "runtime.precision=float32",
        "training.epochs=1", "training.steps_per_epoch=3", "training.verbose=0",
        "data.val_fraction=0.0", *extra])
    result = train(config, strategy=strategy)
    model = get_keras("keras3").models.load_model(result.model_path)
    return result, model.get_weights()


@pytest.mark.parametrize("k", [2])  # k=1 is the same code path (one micro-batch)
def test_training_on_two_replicas_equals_one_device(small_jsonl, tmp_path, k, mirrored):
    """Per-replica batch 8 on 2 replicas trains like batch 16 on one device."""
    acc = f"training.accumulation_steps={k}"
    two, w_two = _train_weights(small_jsonl, tmp_path, "two", mirrored, 8, acc)
    one, w_one = _train_weights(small_jsonl, tmp_path, "one", tf.distribute.get_strategy(),
                                16, acc)
    assert (two.replicas, one.replicas) == (2, 1)
    assert two.train_batches == one.train_batches
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_two, w_one))
    assert diff <= 1e-5
    report = open(two.report_path, encoding="utf-8").read()
    assert "MirroredStrategy x2" in report and "float32" in report


# ---- multi-worker training from the command line ----------------------------------------

def test_cli_train_as_two_workers_writes_once_and_equals_one_process(small_jsonl, tmp_path):
    sets = [f"data.path={small_jsonl}", "data.vocab_size=200", "data.max_length=24",
            "data.batch_size=8", "model.num_layers=1", "model.d_model=16",
            "model.num_heads=2", "model.ffn_dim=32", "model.dropout=0.0",
            "model.shared_kv=true", "runtime.precision=float32", "training.epochs=1",
            "training.steps_per_epoch=3", "training.verbose=0", "data.val_fraction=0.0",
            # The one-process reference below batches by length (packed rows under two
            # workers are checked in test_accumulation's cluster run).
            "data.batching=bucket"]
    run_dir = tmp_path / "cluster"
    results = run_cluster(["-m", "tf_effitrain.cli", "train", "configs/demo_cpu.yaml",
                           "--run-dir", str(run_dir), *sum((["--set", s] for s in sets), [])])
    for code, log in results:
        assert code == 0, log[-3000:]
    logs = [log for _, log in results]
    assert "run directory:" in logs[0] and "test accuracy:" in logs[0]
    assert "MultiWorkerMirroredStrategy x2" in (run_dir / "report.md").read_text()
    # The chief wrote the run directory; the other worker wrote nothing there.
    assert sorted(os.listdir(run_dir)) == sorted([
        "checkpoints", "config.yaml", "confusion.png", "curves.png", "logs", "metrics.jsonl",
        "model.keras",
        "report.md", "run.json", "run.lock", "tokenizer.json", "vocab.txt"])
    # The chief's resumable checkpoints: every `checkpoint_every` (100) and epoch end.
    assert [os.path.basename(p) for p in glob.glob(str(run_dir / "checkpoints" / "*.json"))
            ] == ["ckpt-000000003.json"]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["split"] for r in records] == ["train", "test"]  # one writer, no duplicates
    # One process with the global batch (2 workers x 8) trains the same weights.
    _, single = _train_weights(small_jsonl, tmp_path, "single", tf.distribute.get_strategy(),
                               16)
    cluster = get_keras("keras3").models.load_model(run_dir / "model.keras").get_weights()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(cluster, single))
    assert diff <= 1e-5
