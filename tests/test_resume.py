"""Reliability: killed runs resume exactly, checkpoints are atomic and checked, a finished
run is never lost, non-finite values and signals stop training cleanly, and bad input
leaves an existing run directory byte for byte as it was."""

import glob
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from tf_effitrain.cli import main
from tf_effitrain.errors import DataError, NonFiniteError, RunDirError
from tf_effitrain.training import TrainerPlugin, read_metrics, train
from tf_effitrain.training.checkpoint import list_checkpoints
from tf_effitrain.training.rundir import run_status

from harness import REPO, max_abs_diff, run_python, tiny_config, write_jsonl

# Small and deterministic: 5 updates an epoch (72 training examples in batches of 16;
# fixed batches, so the count does not move with the vocabulary as length buckets'
# would), a checkpoint every 4. Packed rows resume in test_packing.py.
RESUME = ["runtime.deterministic=true", "data.max_examples=300", "training.epochs=2",
          "training.checkpoint_every=4", "data.batching=fixed"]

_SCRIPT = """
import os, signal, sys
sys.path.insert(0, "tests")
from harness import tiny_config
from tf_effitrain.training import TrainerPlugin, train

KILL_AT = {kill_at}

class Kill(TrainerPlugin):
    def callbacks(self, ctx):
        def end(batch, logs):
            if int(ctx.trainable.optimizer.iterations.numpy()) == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
        return [ctx.keras.callbacks.LambdaCallback(on_train_batch_end=end)]

train(tiny_config({data!r}, {run_dir!r}, *{sets!r}), plugins=[Kill()] if KILL_AT else [])
"""


def _run(data, run_dir, sets, kill_at=0):
    return run_python(_SCRIPT.format(data=str(data), run_dir=str(run_dir), sets=sets,
                                     kill_at=kill_at), timeout=600)


def _saved_weights(run_dir):
    """The arrays in a run's model.keras, read without TensorFlow."""
    import h5py

    with zipfile.ZipFile(os.path.join(run_dir, "model.keras")) as z:
        h5 = h5py.File(io.BytesIO(z.read("model.weights.h5")), "r")
        out = {}
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) else None)
    return out


def _snapshot(directory):
    """Every file under `directory` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _train_epochs(run_dir):
    return [r["epoch"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r["split"] == "train"]


class CrashAt(TrainerPlugin):
    """Raises after update `at` (a crash that leaves the run unfinished)."""

    def __init__(self, at, action=None):
        self.at, self.action = at, action

    def callbacks(self, ctx):
        def end(batch, logs):
            if int(np.asarray(ctx.trainable.optimizer.iterations)) == self.at:
                if self.action is None:
                    raise RuntimeError("crash")
                self.action(ctx)
        return [ctx.keras.callbacks.LambdaCallback(on_train_batch_end=end)]


# ---- kill -9 at a random update, resume: bitwise the uninterrupted run -------------------

@pytest.mark.parametrize("engine,k", [
    ("keras3", 1),
    ("tf_keras", 2),
    pytest.param("keras3", 2, marks=pytest.mark.slow),
    pytest.param("tf_keras", 1, marks=pytest.mark.slow),
])
def test_sigkilled_run_resumes_bitwise(small_jsonl, tmp_path, engine, k):
    sets = [*RESUME, f"runtime.engine={engine}", f"training.accumulation_steps={k}"]
    done = _run(small_jsonl, tmp_path / "whole", sets)
    assert done.returncode == 0, done.stderr[-3000:]
    total = read_metrics(str(tmp_path / "whole" / "metrics.jsonl"))[1]["updates"]
    kill_at = random.randint(1, total - 1)
    killed = _run(small_jsonl, tmp_path / "killed", sets, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-3000:])
    assert run_status(str(tmp_path / "killed")) == "running"
    resumed = _run(small_jsonl, tmp_path / "killed", sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The newest checkpoint before the kill: at most `checkpoint_every` updates redone.
    found = re.search(r"resume: from update (\d+) ", resumed.stdout)
    if found is None:
        assert kill_at < 4 and "no usable checkpoint" in resumed.stdout, resumed.stdout
    else:
        assert kill_at - 4 <= int(found.group(1)) <= kill_at, (kill_at, resumed.stdout)
    a, b = _saved_weights(tmp_path / "whole"), _saved_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), (name, kill_at)
    assert _train_epochs(str(tmp_path / "killed")) == [1, 2]  # no duplicate, none missing
    assert run_status(str(tmp_path / "killed")) == "finished"


# ---- crash, damaged checkpoints, MirroredStrategy ---------------------------------------

def test_truncated_newest_checkpoint_falls_back_to_the_previous(small_jsonl, tmp_path,
                                                                capsys):
    whole = train(tiny_config(small_jsonl, tmp_path / "whole", *RESUME))
    run_dir = tmp_path / "crashed"
    config = tiny_config(small_jsonl, run_dir, *RESUME)
    with pytest.raises(RuntimeError, match="crash"):
        train(config, plugins=[CrashAt(10)])
    newest, previous = list_checkpoints(str(run_dir / "checkpoints"))[:2]
    # Every 4 updates and at each epoch end (5 updates an epoch here).
    assert (os.path.basename(newest), os.path.basename(previous)) == (
        "ckpt-000000008.json", "ckpt-000000005.json")
    data = newest.replace(".json", ".npz")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    # A write killed half way: a data file without its JSON, a temporary file.
    open(run_dir / "checkpoints" / "ckpt-000000009.npz", "wb").write(b"partial")
    open(run_dir / "checkpoints" / "ckpt-000000009.json.tmp-1", "wb").write(b"{")
    capsys.readouterr()
    result = train(config)
    out = capsys.readouterr().out
    assert "ckpt-000000008.json skipped" in out and "truncated" in out
    assert "resume: from update 5 (end of epoch 1)" in out
    assert max_abs_diff(_saved_weights(whole.run_dir).values(),
                        _saved_weights(result.run_dir).values()) == 0.0
    assert _train_epochs(result.run_dir) == [1, 2]
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp-*"))


def test_crashed_run_resumes_under_mirrored_strategy(small_jsonl, tmp_path, mirrored, capsys):
    sets = [*RESUME, "data.batch_size=8"]
    whole = train(tiny_config(small_jsonl, tmp_path / "whole", *sets), strategy=mirrored)
    config = tiny_config(small_jsonl, tmp_path / "crashed", *sets)
    with pytest.raises(RuntimeError, match="crash"):
        train(config, strategy=mirrored, plugins=[CrashAt(9)])
    capsys.readouterr()
    resumed = train(config, strategy=mirrored)
    assert "resume: from update 8 (epoch 2, batch 3/5)" in capsys.readouterr().out
    assert resumed.replicas == 2
    # Stated tolerance under MirroredStrategy: 1e-6 (measured: 0.0 on CPU).
    assert max_abs_diff(_saved_weights(whole.run_dir).values(),
                        _saved_weights(resumed.run_dir).values()) <= 1e-6
    assert _train_epochs(resumed.run_dir) == [1, 2]


def test_a_checkpoint_of_another_model_is_refused_not_loaded(small_jsonl, tmp_path):
    from tf_effitrain.training.checkpoint import CheckpointMismatch, _read

    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        train(tiny_config(small_jsonl, run_dir, *RESUME), plugins=[CrashAt(5)])
    newest = list_checkpoints(str(run_dir / "checkpoints"))[0]
    with pytest.raises(CheckpointMismatch, match="do not fit this model"):
        _read(newest, [np.zeros((2, 2))])


# ---- the run directory's life cycle -------------------------------------------------------

def test_finished_run_survives_a_second_train(small_jsonl, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tiny_config(small_jsonl, run_dir, "training.epochs=1")
    train(config)
    before = _snapshot(run_dir)
    with pytest.raises(RunDirError, match="holds a finished run.*--overwrite"):
        train(config)
    with pytest.raises(RunDirError, match="finished run"):
        train(config, resume="never")
    with pytest.raises(RunDirError, match="not extended by a larger `training.epochs`"):
        train(tiny_config(small_jsonl, run_dir, "training.epochs=3"))
    path = tmp_path / "c.yaml"
    from tf_effitrain.config import save_config

    save_config(config, str(path))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert _snapshot(run_dir) == before
    # --overwrite replaces it: one run's records, not two.
    assert main(["train", str(path), "--overwrite"]) == 0
    assert _train_epochs(str(run_dir)) == [1]
    assert run_status(str(run_dir)) == "finished"


def test_unfinished_run_of_another_config_is_refused(small_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        train(tiny_config(small_jsonl, run_dir, *RESUME), plugins=[CrashAt(3)])
    before = _snapshot(run_dir)
    with pytest.raises(RunDirError, match="another config.*model.d_model: 32 .run. vs 16 .now."):
        train(tiny_config(small_jsonl, run_dir, *RESUME, "model.d_model=16"))
    with pytest.raises(RunDirError, match="unfinished run.*--overwrite"):
        train(tiny_config(small_jsonl, run_dir, *RESUME), resume="never")
    assert _snapshot(run_dir) == before


def test_evaluate_refuses_an_unfinished_run(finished_run, tmp_path):
    import shutil

    from tf_effitrain.training import evaluate_run

    _, result = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(result.run_dir, copy)
    with open(copy / "run.json", "w") as f:
        json.dump({"status": "running"}, f)
    with pytest.raises(RunDirError, match="unfinished run"):
        evaluate_run(str(copy))


# ---- bad input: one clear error, the existing directory untouched -------------------------

def _bad_inputs(tmp_path, small_jsonl):
    rows = [{"text": f"words number {i}", "label": "a"} for i in range(20)]
    few = rows[:10] + [{"text": f"other {i}", "label": "b"} for i in range(10)] + [
        {"text": "rare one", "label": "c"}, {"text": "rare two", "label": "c"}]
    empty = rows[:10] + [{"text": "  ", "label": "b"}] + [
        {"text": f"other {i}", "label": "b"} for i in range(10)]
    return {
        "missing": ([f"data.path={tmp_path / 'nope.jsonl'}"], DataError, "not found"),
        "one class": ([f"data.path={write_jsonl(tmp_path / 'one.jsonl', rows)}"],
                      DataError, "at least 2 classes"),
        "too few": ([f"data.path={write_jsonl(tmp_path / 'few.jsonl', few)}",
                     "data.val_fraction=0.3", "data.test_fraction=0.3"],
                    DataError, "'c' \\(2 examples\\) have too few examples to split"),
        "empty text": ([f"data.path={write_jsonl(tmp_path / 'empty.jsonl', empty)}"],
                       DataError, "empty: it tokenizes to nothing"),
    }


@pytest.mark.parametrize("case", ["missing", "one class", "too few", "empty text"])
def test_bad_input_leaves_the_run_directory_as_it_was(finished_run, small_jsonl, tmp_path,
                                                      case):
    import shutil

    _, result = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    before = _snapshot(run_dir)
    sets, error, message = _bad_inputs(tmp_path, small_jsonl)[case]
    config = tiny_config(small_jsonl, run_dir, *sets)
    with pytest.raises(error, match=message):
        train(config, overwrite=True)  # even the most destructive request
    assert _snapshot(run_dir) == before


def test_saved_vocabulary_larger_than_vocab_size_is_an_error(small_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(small_jsonl, run_dir, *RESUME)
    with pytest.raises(RuntimeError, match="crash"):
        train(config, plugins=[CrashAt(2)])
    with open(run_dir / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("".join(f"extra{i}\n" for i in range(400)))
    before = _snapshot(run_dir)
    with pytest.raises(DataError, match="vocab.txt holds .* tokens but `data.vocab_size` is 300"):
        train(config)
    assert _snapshot(run_dir) == before


def test_run_dir_that_is_a_file_is_an_error(small_jsonl, tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(RunDirError, match="is a file"):
        train(tiny_config(small_jsonl, path))
    assert path.read_text() == "keep me"


# ---- non-finite values -------------------------------------------------------------------

def _poison(ctx):
    variable = ctx.model.trainable_variables[0]
    variable.assign(np.full(variable.shape, np.nan, dtype=np.float32))


def test_nonfinite_loss_stops_naming_the_update_and_keeps_the_last_checkpoint(
        small_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(small_jsonl, run_dir, *RESUME)
    with pytest.raises(NonFiniteError, match="NaN/Inf at update 10 .*ckpt-000000008.json"):
        train(config, plugins=[CrashAt(9, action=_poison)])
    newest = list_checkpoints(str(run_dir / "checkpoints"))[0]
    assert os.path.basename(newest) == "ckpt-000000008.json"
    with np.load(newest.replace(".json", ".npz")) as npz:
        assert all(np.isfinite(npz[k]).all() for k in npz.files
                   if npz[k].dtype.kind == "f")
    assert run_status(str(run_dir)) == "running"  # resumable from the good checkpoint


def test_nonfinite_warn_goes_on(small_jsonl, tmp_path, capsys):
    config = tiny_config(small_jsonl, tmp_path / "run", *RESUME, "training.nonfinite=warn")
    result = train(config, plugins=[CrashAt(9, action=_poison)])
    out = capsys.readouterr().out
    assert "non-finite loss at update 10" in out and "checkpoint: not written" in out
    assert result.epochs_run == 2


# ---- SIGINT / SIGTERM from the command line ----------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT,
                                 pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_saves_a_checkpoint_and_the_same_command_resumes(small_jsonl, tmp_path,
                                                                  sig):
    run_dir = tmp_path / "run"
    sets = [f"data.path={small_jsonl}", "data.vocab_size=300", "data.max_length=32",
            "data.batch_size=16", "model.num_layers=1", "model.d_model=32",
            "model.num_heads=2", "model.ffn_dim=64", "runtime.precision=float32",
            "training.verbose=0", "training.epochs=3", "training.checkpoint_every=2"]
    command = [sys.executable, "-m", "tf_effitrain.cli", "train", "configs/demo_cpu.yaml",
               "--run-dir", str(run_dir), *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list_checkpoints(str(run_dir / "checkpoints")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert f"Interrupted by {sig.name}" in err and "Run the same command again" in err
    assert "Traceback" not in err
    # The checkpoint the message names exists and holds the update it says.
    named = re.search(r"checkpoint (checkpoints/ckpt-\d+\.json) \(update (\d+)\)", err)
    with open(run_dir / named.group(1)) as f:
        assert json.load(f)["updates"] == int(named.group(2))
    assert run_status(str(run_dir)) == "running"
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: from update" in again.stdout
    assert _train_epochs(str(run_dir)) == [1, 2, 3]
    assert run_status(str(run_dir)) == "finished"


# ---- the Keras object: a user's own `fit` ---------------------------------------------------

@pytest.mark.parametrize("engine", ["keras3", "tf_keras"])
def test_checkpointing_makes_a_users_own_fit_resumable(engine, tmp_path):
    import tensorflow as tf

    from tf_effitrain.engine import get_keras
    from tf_effitrain.training import Checkpointing

    keras = get_keras(engine)
    rng = np.random.RandomState(0)
    x, y = rng.normal(size=(96, 8)).astype("float32"), rng.randint(0, 3, 96)

    def fit(directory, crash_at=None):
        keras.utils.set_random_seed(0)
        # Built for each run, as a new process would: a reused dataset object continues
        # its shuffle seed's sequence of orders instead of starting it again.
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96, seed=1).batch(16)
        # Keras 3 dropout draws from seed-generator variables (checkpointed); tf_keras'
        # legacy dropout ops keep no restorable state, so its model has none.
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu")]
            + ([keras.layers.Dropout(0.3)] if engine == "keras3" else [])
            + [keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ckpt = Checkpointing(model, str(directory), steps_per_epoch=6, every=4)

        def crash(batch, logs):
            if crash_at and int(np.asarray(model.optimizer.iterations)) == crash_at:
                raise RuntimeError("crash")

        model.fit(ckpt.dataset(ds.repeat()), epochs=3, steps_per_epoch=6,
                  initial_epoch=ckpt.initial_epoch, verbose=0,
                  callbacks=ckpt.callbacks([keras.callbacks.LambdaCallback(
                      on_train_batch_end=crash)]))
        return model.get_weights(), ckpt

    whole, _ = fit(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "crashed", crash_at=11)  # checkpoints at 4, 6 and 8
    resumed, ckpt = fit(tmp_path / "crashed")
    assert (ckpt.point.batches, ckpt.point.batch_in_epoch, ckpt.initial_epoch) == (8, 2, 1)
    assert max_abs_diff(whole, resumed) == 0.0


def test_save_and_load_round_trip_every_dtype_and_keep_the_newest(tmp_path):
    import tensorflow as tf

    from tf_effitrain.training.checkpoint import load_latest_checkpoint, save_checkpoint

    variables = [tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
                 tf.Variable(tf.constant([1.5, -2.25], dtype=tf.bfloat16)),
                 tf.Variable(np.int64(7))]
    saved = [v.numpy().copy() for v in variables]
    for batches in (3, 6, 9):
        save_checkpoint(str(tmp_path), variables, {"batches": batches, "epoch": 0,
                                                   "batch_in_epoch": batches}, keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [
        "ckpt-000000009.json", "ckpt-000000006.json"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000006.json", "ckpt-000000006.npz",
                                            "ckpt-000000009.json", "ckpt-000000009.npz"]
    for v in variables:
        v.assign(tf.zeros_like(v))
    point = load_latest_checkpoint(str(tmp_path), variables, log=print)
    assert (point.batches, point.epoch, point.batch_in_epoch) == (9, 0, 9)
    for v, before in zip(variables, saved):
        assert v.dtype == tf.as_dtype(before.dtype) and np.array_equal(v.numpy(), before)
    # A damaged (not truncated) data file fails its CRC: the previous one is used.
    data = tmp_path / "ckpt-000000009.npz"
    raw = bytearray(data.read_bytes())
    raw[170] ^= 0xFF  # inside the first array's data
    data.write_bytes(bytes(raw))
    lines = []
    assert load_latest_checkpoint(str(tmp_path), variables, log=lines.append).batches == 6
    assert "ckpt-000000009.json skipped" in lines[0]


@pytest.mark.slow
def test_multi_worker_run_killed_on_every_worker_resumes(small_jsonl, tmp_path):
    """Two workers on 127.0.0.1, both killed at update 6; the chief's checkpoint at 5
    (an epoch end) restores on both, and the run ends as the uninterrupted one."""
    from cluster import run_cluster

    sets = [*RESUME, "data.batch_size=8"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    def cluster(run_dir, kill_at):
        code = _SCRIPT.format(data=str(small_jsonl), run_dir=str(run_dir), sets=sets,
                              kill_at=kill_at)
        return run_cluster(["-c", code], timeout=300)

    for code, log in cluster(whole, 0):
        assert code == 0, log[-3000:]
    for code, log in cluster(killed, 6):
        assert code == -signal.SIGKILL, log[-3000:]
    assert run_status(str(killed)) == "running"
    results = cluster(killed, 0)
    for code, log in results:
        assert code == 0, log[-3000:]
    assert "resume: from update 5 (end of epoch 1)" in results[0][1]  # the chief says it
    a, b = _saved_weights(whole), _saved_weights(killed)
    assert max_abs_diff(a.values(), b.values()) <= 1e-6
    assert _train_epochs(str(killed)) == [1, 2]


def _request_stop(ctx):
    ctx.checkpoint.request_stop("SIGINT")


@pytest.mark.parametrize("at,saved", [(2, 3), (4, 5)])
def test_stop_request_mid_epoch_or_at_its_last_batch_resumes_bitwise(
        small_jsonl, tmp_path, capsys, at, saved):
    """A stop requested after update `at` saves at the next batch end; at an epoch's
    last batch (update 5 of 5) that is the epoch-end checkpoint, not a mid-epoch one
    that would shift every later epoch by a batch."""
    newest = f"ckpt-{saved:09d}.json"
    from tf_effitrain.errors import TrainingInterrupted

    whole = train(tiny_config(small_jsonl, tmp_path / "whole", *RESUME))
    config = tiny_config(small_jsonl, tmp_path / "stopped", *RESUME)
    with pytest.raises(TrainingInterrupted, match=f"{newest} \\(update {saved}\\)"):
        train(config, plugins=[CrashAt(at, action=_request_stop)])
    state = json.load(open(tmp_path / "stopped" / "checkpoints" / newest))
    assert (state["batches"], state["batch_in_epoch"]) == (saved, saved % 5)
    resumed = train(config)
    assert max_abs_diff(_saved_weights(whole.run_dir).values(),
                        _saved_weights(resumed.run_dir).values()) == 0.0
    assert _train_epochs(resumed.run_dir) == [1, 2]


def test_resume_with_another_global_batch_is_refused(small_jsonl, tmp_path, mirrored):
    from tf_effitrain.training.checkpoint import CheckpointMismatch

    config = tiny_config(small_jsonl, tmp_path / "run", *RESUME)
    with pytest.raises(RuntimeError, match="crash"):
        train(config, plugins=[CrashAt(6)])
    before = _snapshot(tmp_path / "run")
    # Two replicas double the global batch: the saved input position means nothing.
    with pytest.raises(CheckpointMismatch, match="global_batch=16, this run has "
                                                 "global_batch=32"):
        train(config, strategy=mirrored)
    after = _snapshot(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"}


def test_a_second_train_in_a_running_directory_is_refused(small_jsonl, tmp_path):
    from tf_effitrain.training.rundir import lock_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = lock_run_dir(str(run_dir))  # as a live `train` holds it
    try:
        with pytest.raises(RunDirError, match="Another `tf-effitrain` process"):
            train(tiny_config(small_jsonl, run_dir, *RESUME))
    finally:
        held.close()


@pytest.mark.parametrize("extra,crash_at", [
    (["optimizer.ema_momentum=0.9"], 7),          # EMA averages are optimizer state
    (["training.steps_per_execution=2"], 8),      # epoch-end checkpoints only
])
def test_crashed_run_with_ema_or_steps_per_execution_resumes_bitwise(small_jsonl, tmp_path,
                                                                     extra, crash_at):
    whole = train(tiny_config(small_jsonl, tmp_path / "whole", *RESUME, *extra))
    config = tiny_config(small_jsonl, tmp_path / "crashed", *RESUME, *extra)
    with pytest.raises(RuntimeError, match="crash"):
        train(config, plugins=[CrashAt(crash_at)])
    resumed = train(config)
    assert max_abs_diff(_saved_weights(whole.run_dir).values(),
                        _saved_weights(resumed.run_dir).values()) == 0.0
    assert _train_epochs(resumed.run_dir) == [1, 2]


class CrashAfterFit(TrainerPlugin):
    def finish_model(self, ctx, model):
        raise RuntimeError("crash after fit")


def test_early_stopped_run_killed_before_it_finished_does_not_train_again(small_jsonl,
                                                                          tmp_path):
    extra = ["training.early_stopping_patience=1", "training.best_metric=val_loss",
             "training.epochs=12", "optimizer.learning_rate=0.01"]
    whole = train(tiny_config(small_jsonl, tmp_path / "whole", *RESUME, *extra))
    assert whole.epochs_run < 12  # early stopping ended it
    config = tiny_config(small_jsonl, tmp_path / "crashed", *RESUME, *extra)
    with pytest.raises(RuntimeError, match="crash after fit"):
        train(config, plugins=[CrashAfterFit()])
    resumed = train(config)
    assert (resumed.epochs_run, resumed.best_epoch) == (whole.epochs_run, whole.best_epoch)
    assert _train_epochs(resumed.run_dir) == list(range(1, whole.epochs_run + 1))
    assert max_abs_diff(_saved_weights(whole.run_dir).values(),
                        _saved_weights(resumed.run_dir).values()) == 0.0
