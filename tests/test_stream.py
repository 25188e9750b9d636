"""Streaming sources: sharded / gzip / TFRecord files, the hash and file splits, per-worker
file sharding, and streamed training (`data.stream: true`)."""

import csv
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import ConfigError, DataConfig
from tf_effitrain.data.pipeline import prepare_data
from tf_effitrain.data.sources import DataError, load_examples
from tf_effitrain.data.splits import hash_split
from tf_effitrain.data.stream import estimate_batches, scan, stream_examples
from tf_effitrain.training import read_metrics

from cluster import run_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTUNES = os.path.join(REPO, "data", "fortunes", "fortunes.jsonl")


def _records(n=None):
    with open(FORTUNES) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # The file is sorted by class: an evenly spaced subset has every class.
    return rows[::len(rows) // n][:n] if n else rows


def _shards(directory, rows, shards, compress=True, stem="train"):
    """`rows` as `shards` JSONL files (round robin), gzip-compressed or plain."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k in range(shards):
        path = os.path.join(directory, f"{stem}-{k:03d}.jsonl" + (".gz" if compress else ""))
        opener = gzip.open if compress else open
        with opener(path, "wt", encoding="utf-8") as f:
            for row in rows[k::shards]:
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def _examples(cfg, info, split):
    """Sorted `(text, label)` pairs of one streamed split."""
    return sorted((t.decode(), int(y)) for t, y in
                  stream_examples(cfg, info, split).as_numpy_iterator())


def test_hash_split_is_disjoint_close_to_its_fractions_and_keeps_duplicates_together():
    texts = [f"example number {i}" for i in range(20000)]
    splits = [hash_split(t, 0.1, 0.2) for t in texts]
    shares = {name: splits.count(name) / len(texts) for name in ("train", "validation", "test")}
    # Binomial noise at n=20000: sd ~0.003; 0.015 is 5 sd.
    assert abs(shares["test"] - 0.2) < 0.015 and abs(shares["validation"] - 0.1) < 0.015
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(hash_split(t, 0.1, 0.2) == s for t, s in zip(texts[:100], splits))


def test_hash_split_is_the_same_in_a_fresh_process():
    """Not Python's salted `hash`: another interpreter (another PYTHONHASHSEED) agrees."""
    texts = [f"text {i} é" for i in range(300)]
    code = ("import json, sys; from tf_effitrain.data.splits import hash_split; "
            "print(json.dumps([hash_split(t, 0.1, 0.1) for t in json.load(sys.stdin)]))")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), env=env,
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert json.loads(out) == [hash_split(t, 0.1, 0.1) for t in texts]
    assert len(set(json.loads(out))) == 3


def test_sharded_gzip_jsonl_equals_one_plain_file(tmp_path):
    """Same examples, same labels, same split: in memory and streamed."""
    rows = _records()
    plain = _shards(tmp_path / "plain", rows, 1, compress=False)[0]
    _shards(tmp_path / "gz", rows, 5)
    pattern = str(tmp_path / "gz" / "train-*.jsonl.gz")
    one, many = (DataConfig(path=plain, split="hash"), DataConfig(path=pattern, split="hash"))
    a, b = load_examples(one), load_examples(many)
    assert a.class_names == b.class_names
    assert sorted(zip(a.texts, a.labels, a.splits)) == sorted(zip(b.texts, b.labels, b.splits))
    one_s, many_s = (DataConfig(path=plain, stream=True), DataConfig(path=pattern, stream=True))
    info_a, info_b = scan(one_s), scan(many_s)
    assert info_a.counts == info_b.counts and info_a.class_counts == info_b.class_counts
    assert len(info_b.files[None]) == 5
    for split in ("train", "validation", "test"):
        streamed = _examples(many_s, info_b, split)
        assert streamed == _examples(one_s, info_a, split)
        assert len(streamed) == info_b.counts[split]
        in_memory = sorted((t, y) for t, y, s in zip(a.texts, a.labels, a.splits) if s == split)
        assert streamed == in_memory


def test_tfrecord_and_gzip_csv_sources_equal_jsonl(tmp_path):
    rows = _records(200)
    jsonl = _shards(tmp_path, rows, 1, compress=False)[0]
    record_path = str(tmp_path / "d.tfrecord.gz")
    with tf.io.TFRecordWriter(record_path, options="GZIP") as w:
        for row in rows:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "text": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[row["text"].encode()])),
                "label": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[row["label"].encode()])),
            })).SerializeToString())
    csv_path = str(tmp_path / "d.csv.gz")
    with gzip.open(csv_path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    reference = load_examples(DataConfig(path=jsonl))
    streamed = DataConfig(path=jsonl, stream=True)
    streamed_info = scan(streamed)
    for source, path in (("tfrecord", record_path), ("csv", csv_path)):
        ex = load_examples(DataConfig(source=source, path=path))
        assert (ex.texts, ex.labels, ex.class_names) == (
            reference.texts, reference.labels, reference.class_names)
        cfg = DataConfig(source=source, path=path, stream=True)
        info = scan(cfg)
        assert info.counts == streamed_info.counts
        assert _examples(cfg, info, "train") == _examples(streamed, streamed_info, "train")


def test_split_files_reads_each_split_from_its_own_files(tmp_path):
    rows = _records()
    train = _shards(tmp_path, rows[:2000], 3, stem="train")
    _shards(tmp_path, rows[2000:2400], 1, stem="val")
    _shards(tmp_path, rows[2400:], 1, stem="test")
    common = dict(path=str(tmp_path / "train-*.jsonl.gz"),
                  validation_path=str(tmp_path / "val-*.jsonl.gz"),
                  test_path=str(tmp_path / "test-*"))
    memory = load_examples(DataConfig(**common))
    assert memory.splits.count("validation") == 400 and memory.splits.count("train") == 2000
    cfg = DataConfig(stream=True, **common)
    assert cfg.split_method == "files"
    info = scan(cfg)
    assert info.counts == {"train": 2000, "validation": 400, "test": len(rows) - 2400}
    assert len(info.files["train"]) == len(train)
    assert _examples(cfg, info, "validation") == sorted(
        (r["text"], info.class_names.index(r["label"])) for r in rows[2000:2400])


def test_two_workers_read_distinct_files(tmp_path):
    """MultiWorkerMirroredStrategy, 2 processes on 127.0.0.1: with 4 shards each worker's
    input pipeline reads 2 whole files, none read twice, and together all of them."""
    rows = _records(800)
    paths = _shards(tmp_path, rows, 4)
    file_of = {}
    for path in paths:
        with gzip.open(path, "rt") as f:
            for line in f:
                file_of[json.loads(line)["text"]] = path
    out = str(tmp_path / "seen")
    results = run_cluster([os.path.join("tests", "multiworker_stream.py"),
                           str(tmp_path / "train-*.jsonl.gz"), out], timeout=240)
    for code, output in results:
        assert code == 0, output[-3000:]
    seen = [json.load(open(f"{out}_{i}.json")) for i in range(2)]
    assert sorted(s["pipelines"][0] for s in seen) == [0, 1]
    files = [{file_of[t] for t in s["texts"]} for s in seen]
    assert len(files[0]) == len(files[1]) == 2 and not files[0] & files[1]
    texts = [s["texts"] for s in seen]
    assert not set(texts[0]) & set(texts[1])
    train = {r["text"] for r in rows if hash_split(r["text"], 0.1, 0.1) == "train"}
    assert set(texts[0]) | set(texts[1]) == train
    assert len(texts[0]) + len(texts[1]) == len(train)


def test_one_file_is_sharded_by_example_across_pipelines(tmp_path):
    path = _shards(tmp_path, _records(300), 1)[0]
    cfg = DataConfig(path=path, stream=True)
    info = scan(cfg)
    parts = [sorted(t.decode() for t, _ in stream_examples(
        cfg, info, "train", tf.distribute.InputContext(2, i, 2)).as_numpy_iterator())
        for i in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == info.counts["train"]


@pytest.mark.parametrize("batching", ["fixed", "pack"])
def test_each_input_pipeline_batches_its_own_files_per_replica(tmp_path, batching):
    """`DataBundle.train_fn` (what every worker builds under MultiWorker): pipeline `i`
    of 2 (workers of 2 replicas each) batches only the examples of its own files, in
    per-replica batches (a quarter of the global batch), and the two pipelines together
    hold the whole training split."""
    from tf_effitrain.data.pipeline import tokenize_examples
    from tf_effitrain.data.tokenizer import make_tokenizer

    def examples(batch):
        if batching != "pack":
            return [tuple(row[row > 0]) for row in batch[0]]
        ids, segments = batch[0]["token_ids"], batch[0]["segment_ids"]
        return [tuple(row[seg == s]) for row, seg in zip(ids, segments)
                for s in range(1, int(seg.max()) + 1)]

    _shards(tmp_path / "d", _records(400), 4)
    cfg = DataConfig(path=str(tmp_path / "d" / "train-*.jsonl.gz"), stream=True,
                     vocab_size=300, max_length=32, batching=batching)
    data = prepare_data(cfg, seed=0, train_batch_size=16, train_batch_multiple=4)
    info = scan(cfg)
    tokenizer = make_tokenizer(data.vocab, cfg.lowercase)
    ids_of = {}
    for i in range(2):
        context = tf.distribute.InputContext(2, i, 4)
        mine = sorted(t.decode() for t, _ in
                      stream_examples(cfg, info, "train", context).as_numpy_iterator())
        ids, sizes = [], []
        for batch in data.train_fn(context).as_numpy_iterator():
            sizes.append((batch[0]["token_ids"] if batching == "pack" else batch[0]).shape[0])
            ids += examples(batch)
        per_replica = data.packing["train"]["batch_rows"] // 4 if batching == "pack" else 4
        # Packed batches are completed with empty rows; the last fixed batch is the rest.
        assert set(sizes[:-1]) == {per_replica} and 0 < sizes[-1] <= per_replica
        assert sorted(ids) == sorted(tuple(x) for x, _ in tokenize_examples(
            tf.data.Dataset.from_tensor_slices((mine, [0] * len(mine))), tokenizer,
            32).as_numpy_iterator())
        ids_of[i] = ids
    whole = []
    for batch in data.train.as_numpy_iterator():
        whole += examples(batch)
    assert sorted(ids_of[0] + ids_of[1]) == sorted(whole)


class _Workers:
    """A strategy of `workers` workers with `local` replicas each, as seen by the first
    worker's `distribute_datasets_from_function` (the per-worker dataset itself)."""

    def __init__(self, workers, local):
        self.context = tf.distribute.InputContext(workers, 0, workers * local)

    def distribute_datasets_from_function(self, dataset_fn):
        return dataset_fn(self.context)


def test_a_worker_with_several_replicas_resumes_its_pipeline_per_replica(tmp_path):
    """Resumed at update 3 on a worker feeding 2 local replicas, its pipeline skips 6
    of its per-replica batches; a worker layout the files do not divide warns."""
    import functools
    import types

    from tf_effitrain.errors import DataWarning
    from tf_effitrain.training.checkpoint import Checkpointing
    from tf_effitrain.training.trainer import _per_worker_stream

    def streamed(shards):
        _shards(tmp_path / str(shards), _records(400), shards)
        cfg = DataConfig(path=str(tmp_path / str(shards) / "train-*.jsonl.gz"),
                         stream=True, vocab_size=300, max_length=32, batching="fixed")
        data = prepare_data(cfg, seed=0, train_batch_size=16, train_batch_multiple=4)
        return types.SimpleNamespace(examples=scan(cfg), data=data, log=lines.append,
                                     strategy=_Workers(2, 2))

    lines = []
    ctx = streamed(4)
    resumed = types.SimpleNamespace(point=types.SimpleNamespace(batches=3))
    resumed.dataset = functools.partial(Checkpointing.dataset, resumed)
    got = _per_worker_stream(ctx, resumed)
    want = ctx.data.train_fn(ctx.strategy.context).repeat().skip(6)
    for a, b in zip(got.take(10).as_numpy_iterator(), want.take(10).as_numpy_iterator()):
        np.testing.assert_array_equal(a[0], b[0])
    assert lines == ["data: input pipeline 0 of 2 reads 2 of 4 training files: "
                     "train-000.jsonl.gz, train-002.jsonl.gz"]
    with pytest.warns(DataWarning, match="3 training files do not divide evenly among 2"):
        _per_worker_stream(streamed(3), resumed)


def test_a_streamed_checkpoint_records_the_worker_layout(monkeypatch, tmp_path):
    """Each worker's stream depends on the workers and replicas: a checkpoint records
    them, and resuming on another layout with the same global batch is refused."""
    import types

    from tf_effitrain.config import load_config
    from tf_effitrain.training import trainer
    from tf_effitrain.training.checkpoint import (
        CheckpointMismatch,
        load_latest_checkpoint,
        save_checkpoint,
    )

    strategy = types.SimpleNamespace(num_replicas_in_sync=4, extended=types.SimpleNamespace(
        worker_devices=("/cpu:0", "/cpu:1")))
    ctx = types.SimpleNamespace(config=load_config(None, ["data.stream=true"]),
                                strategy=strategy,
                                data=types.SimpleNamespace(train_fn=lambda context: None))
    monkeypatch.setattr(trainer, "_per_worker", lambda ctx: True)
    batch = ctx.config.data.batch_size * 4
    assert trainer._stream_layout(ctx) == {"global_batch": batch, "input_pipelines": 2,
                                           "replicas": 4}
    # One process, the default strategy (which has no `worker_devices`).
    monkeypatch.undo()
    ctx.strategy = tf.distribute.get_strategy()
    one = ctx.config.data.batch_size
    single = trainer._stream_layout(ctx)
    assert single == {"global_batch": one, "input_pipelines": 1}
    ctx.config = load_config(None, [])
    assert trainer._stream_layout(ctx) == {"global_batch": one}
    # Written by one process (its stream), read by two workers of two replicas each.
    variables = [tf.Variable([1.0, 2.0])]
    save_checkpoint(str(tmp_path), variables, {"batches": 4, "epoch": 0,
                                               "batch_in_epoch": 4, **single})
    with pytest.raises(CheckpointMismatch,
                       match="input_pipelines=1, this run has input_pipelines=2"):
        load_latest_checkpoint(str(tmp_path), variables, expect={
            "global_batch": one, "input_pipelines": 2, "replicas": 4})


_WORKER = """
import os, signal, sys
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other op
sys.path.insert(0, "tests")
from harness import tiny_config
from tf_effitrain.training import TrainerPlugin, train

class Kill(TrainerPlugin):
    def callbacks(self, ctx):
        def end(batch, logs):
            if int(ctx.trainable.optimizer.iterations.numpy()) == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
        return [ctx.keras.callbacks.LambdaCallback(on_train_batch_end=end)]

class Fed(TrainerPlugin):
    # What the trainer feeds this worker: one pass of the pipeline it builds.
    def callbacks(self, ctx):
        build = ctx.data.train_fn

        def fed(context):
            ds = build(context)
            sizes = [int(x.shape[0]) for x, *_ in ds]
            print(f"FED {{context.input_pipeline_id}} {{sum(sizes)}} {{max(sizes)}}",
                  flush=True)
            return ds

        ctx.data.train_fn = fed
        return []

config = tiny_config({data!r}, {run_dir!r}, *{sets!r})
train(config, strategy=strategy, plugins=[Fed(), Kill()] if {kill_at} else [Fed()])
"""


def test_two_worker_streamed_training_reads_its_own_files_and_resumes(tmp_path):
    """`train` under MultiWorkerMirroredStrategy, 2 processes on 127.0.0.1, streaming 4
    gzip shards: each worker's input pipeline reads its own 2 files. Both workers killed
    (kill -9) in the second epoch resume, each at its own position in its own stream,
    and end where the uninterrupted run did (restarting the streams instead: 1.5e-3)."""
    import signal

    from test_resume import _saved_weights, _train_epochs

    from harness import max_abs_diff

    _shards(tmp_path / "d", _records(400), 4)
    data = str(tmp_path / "d" / "train-*.jsonl.gz")
    sets = ["data.stream=true", "data.batch_size=8", "data.batching=fixed",
            "runtime.deterministic=true", "training.checkpoint_every=4",
            # The last epoch's weights (not the best epoch's) show a wrong position.
            "model.dropout=0.0", "training.verbose=2", "training.keep_best=false"]

    def cluster(run_dir, kill_at=0):
        code = _WORKER.format(data=data, run_dir=str(run_dir), sets=sets, kill_at=kill_at)
        return run_cluster(["-c", code], timeout=300)

    whole = cluster(tmp_path / "whole")
    for code, log in whole:
        assert code == 0, log[-3000:]
    read = [re.search(r"input pipeline (\d) of 2 reads 2 of 4 training files: (.*)",
                      log) for _, log in whole]
    assert all(read), whole[0][1][-3000:]
    assert sorted(m.group(1) for m in read) == ["0", "1"]
    files = [set(m.group(2).split(", ")) for m in read]
    assert not files[0] & files[1]
    assert files[0] | files[1] == {f"train-{k:03d}.jsonl.gz" for k in range(4)}
    # Each worker is fed its own share of the training split, in per-replica batches.
    fed = sorted(tuple(int(v) for v in re.search(r"FED (\d) (\d+) (\d+)", log).groups())
                 for _, log in whole)
    train_examples = scan(DataConfig(path=data, stream=True)).counts["train"]
    assert [f[0] for f in fed] == [0, 1] and [f[2] for f in fed] == [8, 8]
    assert sum(f[1] for f in fed) == train_examples and max(f[1] for f in fed) < 200
    updates = [r["updates"] for r in read_metrics(
        str(tmp_path / "whole" / "metrics.jsonl")) if r["split"] == "train"]
    killed = cluster(tmp_path / "killed", kill_at=updates[0] + 5)
    for code, log in killed:
        assert code == -signal.SIGKILL, log[-3000:]
    resumed = cluster(tmp_path / "killed")
    for code, log in resumed:
        assert code == 0, log[-3000:]
    assert "resume: from update" in resumed[0][1]
    a, b = _saved_weights(tmp_path / "whole"), _saved_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert max_abs_diff(list(a.values()), list(b.values())) <= 1e-6
    assert _train_epochs(str(tmp_path / "killed")) == [1, 2]


def test_scan_samples_deterministically_and_counts_classes(tmp_path):
    cfg = DataConfig(stream=True, vocab_sample=100)
    a, b, c = scan(cfg, seed=1), scan(cfg, seed=1), scan(cfg, seed=2)
    assert a.sample == b.sample and a.sample != c.sample and len(a.sample) == 100
    assert set(a.sample) <= {t for t, _ in _examples(cfg, a, "train")}
    assert sum(a.class_counts["train"]) == a.counts["train"]


@pytest.mark.parametrize("make, error, message", [
    (lambda p: DataConfig(path=str(p / "none-*.jsonl"), stream=True), DataError,
     "No file matches the pattern"),
    (lambda p: DataConfig(path=_shards(p, [{"text": "a", "label": "x"},
                                           {"text": "b", "label": "zz"}], 1)[0],
                          classes=["x", "y"], stream=True), DataError,
     r"train-000.jsonl.gz:2: label 'zz' is out of range"),
    (lambda p: DataConfig(path=_shards(p, [], 1)[0], stream=True), DataError,
     "No examples found"),
    (lambda p: DataConfig(path=_shards(p, [{"text": "a", "label": "x"},
                                           {"text": " ", "label": "y"}], 1)[0],
                          stream=True), DataError, ":2: `text` is empty"),
    (lambda p: DataConfig(stream=True, split="stratified"), ConfigError,
     "needs every label in memory"),
    (lambda p: DataConfig(stream=True, max_examples=10), ConfigError, "max_examples"),
    (lambda p: DataConfig(split="files"), ConfigError, "validation_path"),
    (lambda p: DataConfig(source="tfds", tfds_name="x", test_path="t.jsonl"), ConfigError,
     "file source"),
])
def test_bad_streamed_input_fails_before_training(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        scan(make(tmp_path))


def test_a_truncated_gzip_shard_is_named(tmp_path):
    path = _shards(tmp_path, _records(300), 1)[0]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-000.jsonl.gz: not a complete gzip file"):
        scan(DataConfig(path=path, stream=True))


def test_bad_gzip_bytes_name_the_line(tmp_path):
    path = str(tmp_path / "bad.jsonl.gz")
    with gzip.open(path, "wb") as f:
        f.write(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: not valid UTF-8"):
        scan(DataConfig(path=path, stream=True))


@pytest.mark.parametrize("batching", ["bucket", "pack", "fixed"])
def test_streamed_bundle_estimates_the_epoch_within_a_few_percent(tmp_path, batching):
    cfg = DataConfig(stream=True, batching=batching, vocab_size=1000, max_length=64)
    data = prepare_data(cfg, seed=3, run_dir=str(tmp_path))
    actual = int(data.train.reduce(0, lambda n, _: n + 1))
    if batching == "fixed":
        assert data.train_batches == actual
    else:
        assert abs(data.train_batches - actual) <= max(2, 0.05 * actual), (
            data.train_batches, actual)
    x = next(iter(data.train))[0]
    ids = x["token_ids"] if isinstance(x, dict) else x
    assert ids.shape[1] <= 64 and ids.dtype == tf.int32
    assert data.split_sizes["train"] > 0 and data.majority_baseline is not None
    assert data.validation is not None and data.test is not None


def test_estimate_batches_of_buckets():
    cfg = DataConfig(batching="bucket", bucket_boundaries=[10], max_length=20)
    lengths = np.array([5] * 50 + [15] * 50)
    assert estimate_batches(cfg, 1000, 32, lengths) == 2 * 16  # ceil(500 / 32) each
    assert estimate_batches(cfg, 1000, 32, lengths, drop_remainder=True) == 2 * 15


def test_tfds_source_streams_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    cfg = DataConfig(source="tfds", tfds_name="imdb_reviews", stream=True,
                     vocab_size=200, max_length=32, batch_size=8)
    with tfds.testing.mock_data(num_examples=60):
        info = scan(cfg)
        assert len(info) == 60 and info.class_names == ["neg", "pos"]
        train = _examples(cfg, info, "train")
    assert len(train) == info.counts["train"]


def test_cli_trains_a_streamed_sharded_gzip_corpus_and_evaluate_agrees(tmp_path, capsys):
    """The config path: `data.stream: true` on shards; the final test figures equal
    `tf-effitrain evaluate` on the re-created streamed test split; a second run in
    another directory reuses the cached vocabulary."""
    from harness import TINY

    from tf_effitrain.cli import main

    _shards(tmp_path / "d", _records(), 3)
    pattern = str(tmp_path / "d" / "train-*.jsonl.gz")
    run_dir = str(tmp_path / "run")
    sets = [x for item in (*TINY, f"data.path={pattern}", "data.stream=true",
                           "data.batching=pack") for x in ("--set", item)]
    assert main(["train", "configs/demo_cpu.yaml", "--run-dir", run_dir, *sets]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "test macro-F1:" in out
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    test = next(m for m in metrics if m.get("split") == "test")
    assert main(["evaluate", run_dir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)
    # Every streamed test example was counted once in the confusion matrix.
    info = scan(DataConfig(path=pattern, stream=True))
    assert int(np.sum(test["confusion"])) == info.counts["test"]


@pytest.mark.parametrize("engine", ["keras3", "tf_keras"])
def test_streamed_bundle_in_your_own_fit(tmp_path, engine):
    """The Keras-object path: `prepare_data` with `stream=True`, then a plain `fit`
    on the repeated stream with `steps_per_epoch=train_batches`, validating on the
    streamed (unknown-length) validation split."""
    from tf_effitrain.config import ModelConfig
    from tf_effitrain.engine import get_keras
    from tf_effitrain.models import build_transformer_classifier

    keras = get_keras(engine)
    cfg = DataConfig(stream=True, vocab_size=300, max_length=32, batch_size=32)
    data = prepare_data(cfg, seed=0, run_dir=str(tmp_path))
    keras.utils.set_random_seed(0)
    model = build_transformer_classifier(
        ModelConfig(d_model=32, num_heads=2, ffn_dim=64, num_layers=1), len(data.vocab),
        len(data.class_names), 32, keras=keras)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(data.train.repeat(), steps_per_epoch=data.train_batches, epochs=2,
                        validation_data=data.validation, verbose=0)
    assert int(model.optimizer.iterations) == 2 * data.train_batches
    assert history.history["val_accuracy"][-1] > data.majority_baseline


def test_sigkilled_streamed_run_resumes_bitwise(tmp_path):
    """kill -9 in the second epoch of a streamed, packed run on gzip shards; the resumed
    run skips to its position in the same stream and ends bitwise equal to the whole run."""
    import signal

    from test_resume import _run, _saved_weights, _train_epochs, read_metrics

    _shards(tmp_path / "d", _records(400), 3)
    data = str(tmp_path / "d" / "train-*.jsonl.gz")
    sets = ["runtime.deterministic=true", "training.epochs=2", "training.checkpoint_every=3",
            "data.stream=true", "data.batching=pack"]
    done = _run(data, tmp_path / "whole", sets)
    assert done.returncode == 0, done.stderr[-3000:]
    total = read_metrics(str(tmp_path / "whole" / "metrics.jsonl"))[1]["updates"]
    kill_at = total // 2 + 2  # in the second epoch, past a checkpoint
    killed = _run(data, tmp_path / "killed", sets, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(data, tmp_path / "killed", sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: from update" in resumed.stdout
    a, b = _saved_weights(tmp_path / "whole"), _saved_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert _train_epochs(str(tmp_path / "killed")) == [1, 2]
