"""Sequence packing: several examples per row, each computed exactly as if alone.

Tolerances (float32): a packed example's logits equal its logits alone to 1e-5; two
updates on packed rows equal two updates of the plain model on the same examples padded
into one batch (dense gradients, mean loss over examples, SGD with momentum at a large
rate) to 1e-5 (measured ~1e-6: the sums run in another order), also with accumulation,
under MirroredStrategy and (in test_accumulation's cluster run)
MultiWorkerMirroredStrategy.
"""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import ModelConfig, load_config
from tf_effitrain.data.packing import (
    batch_packed,
    pack_examples,
    pack_window,
    packed_accuracy,
    rows_per_batch,
    shuffle_segments,
)
from tf_effitrain.engine import get_keras
from tf_effitrain.errors import ConfigError
from tf_effitrain.models import build_transformer_classifier
from tf_effitrain.training.accumulation import accumulate

from harness import ENGINES, FORTUNES, max_abs_diff, tiny_config

VOCAB, CLASSES, LENGTH, SLOTS = 60, 3, 24, 6
TOL = 1e-5
ALIGN = {"full": 1, "local": 1, "block_sparse": 8}


def _examples(n=20, seed=0):
    """`n` examples of 1..LENGTH tokens (padded with 0 to LENGTH) and their labels."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, LENGTH + 1, size=n)
    lengths[:3] = [LENGTH, 1, 2]  # a full row and the shortest examples
    ids = np.zeros((n, LENGTH), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.randint(1, VOCAB, size=length)
    return ids, rng.randint(0, CLASSES, size=n).astype(np.int32), lengths


def _models(keras, attention="full", seed=1):
    keras.utils.set_random_seed(seed)
    cfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, ffn_dim=24, dropout=0.0,
                      shared_kv=True, attention=attention, window=3, block_size=8)
    return build_transformer_classifier(cfg, VOCAB, CLASSES, LENGTH, keras=keras,
                                        max_segments=SLOTS)


def _slots(packed_ids, segments, mask, ids, lengths):
    """`{example index: (row, slot)}`, found by each slot's tokens."""
    where = {}
    for r in range(len(packed_ids)):
        for s in range(SLOTS):
            if mask[r, s]:
                tokens = packed_ids[r][segments[r] == s + 1]
                i = next(i for i in range(len(ids)) if i not in where and lengths[i] ==
                         len(tokens) and (ids[i, :lengths[i]] == tokens).all())
                where[i] = (r, s)
    return where


# ---- the packer -----------------------------------------------------------------------

@pytest.mark.parametrize("align", [1, 8])
def test_every_example_is_placed_once_whole_and_aligned(align):
    ids, labels, lengths = _examples(40)
    packed_ids, segments, slot_labels, mask = (
        t.numpy() for t in pack_window(ids, labels, SLOTS, align))
    assert packed_ids.shape[1] == LENGTH and len(packed_ids) <= len(ids)
    where = _slots(packed_ids, segments, mask, ids, lengths)
    assert sorted(where) == list(range(len(ids)))  # each example exactly once
    assert mask.sum() == len(ids) and (mask.sum(1) <= SLOTS).all()
    for i, (r, s) in where.items():
        assert slot_labels[r, s] == labels[i]
        positions = np.flatnonzero(segments[r] == s + 1)
        # Contiguous, starting on an `align` boundary.
        assert (np.diff(positions) == 1).all() and positions[0] % align == 0
    assert ((packed_ids != 0) == (segments != 0)).all()
    # Fuller than one example per row: rows are shared.
    assert len(packed_ids) < len(ids)


@pytest.mark.parametrize("align", [1, 8])
def test_segment_shuffle_permutes_within_each_segment_only(align):
    ids, labels, lengths = _examples(30)
    packed_ids, segments, _, _ = (t.numpy() for t in pack_window(ids, labels, SLOTS, align))
    assert align == 1 or (segments == 0).any(axis=1).sum() > len(segments) // 2  # gaps
    tf.random.set_seed(3)
    changed = 0
    for prob in (1.0, 0.5):
        for row, seg in zip(packed_ids, segments):
            out = shuffle_segments(tf.constant(row), tf.constant(seg), prob).numpy()
            for s in set(seg) - {0}:  # each segment keeps its tokens, in its positions
                assert sorted(out[seg == s]) == sorted(row[seg == s])
            assert (out[seg == 0] == 0).all()  # padding and alignment gaps stay put
            changed += int((out != row).any())
    assert changed > 0
    row, seg = tf.constant(packed_ids[0]), tf.constant(segments[0])
    assert (shuffle_segments(row, seg, 0.0).numpy() == packed_ids[0]).all()
    with pytest.raises(ValueError, match="`prob` must be in"):
        shuffle_segments(row, seg, 1.5)


def test_rows_per_batch_is_a_multiple_of_replicas_times_steps():
    assert rows_per_batch(32, 2278, 896, 1) == 13
    assert rows_per_batch(32, 2278, 896, 4) == 12
    assert rows_per_batch(1, 1000, 10, 2) == 2  # never fewer than the multiple


# ---- the model ------------------------------------------------------------------------

def _packed_case(engine, attention):
    """Both models and 20 examples, plain and packed for `attention`."""
    model, packed = _models(get_keras(engine), attention)
    ids, labels, lengths = _examples(20)
    packed_ids, segments, _, mask = (t.numpy() for t in pack_window(
        ids, labels, SLOTS, ALIGN[attention]))
    x = {"token_ids": packed_ids, "segment_ids": segments}
    return model, packed, ids, lengths, x, mask


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("attention", ["full", "local", "block_sparse"])
def test_packed_logits_equal_each_example_alone(engine, attention):
    model, packed, ids, lengths, x, mask = _packed_case(engine, attention)
    out = np.asarray(packed(x))
    assert out.shape == (len(x["token_ids"]), SLOTS, CLASSES)
    slots = _slots(x["token_ids"], x["segment_ids"], mask, ids, lengths)
    for i, (r, s) in slots.items():
        alone = np.asarray(model(ids[i:i + 1, :lengths[i]]))[0]
        assert np.max(np.abs(out[r, s] - alone)) <= 1e-5, (i, attention)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("attention", ["full", "local", "block_sparse"])
def test_training_and_inference_masking_compute_the_same_function(engine, attention):
    """Training's additive mask and the int8-friendly inference mask (no dropout here)."""
    model, packed, ids, _, x, _ = _packed_case(engine, attention)
    for net, inputs in ((model, ids), (packed, x)):
        trained = np.asarray(net(inputs, training=True))
        inferred = np.asarray(net(inputs, training=False))
        assert np.max(np.abs(trained - inferred)) <= 1e-6


def _packed_batch(ids, labels, multiple, align=1):
    """All examples as one packed batch whose row count is a multiple of `multiple`."""
    rows = pack_examples(tf.data.Dataset.from_tensor_slices((ids, labels)), LENGTH, SLOTS,
                         align)
    num_rows = int(rows.reduce(0, lambda n, _: n + 1))
    return next(iter(batch_packed(rows, -(-num_rows // multiple) * multiple, LENGTH,
                                  SLOTS)))


def _reference(keras, ids, labels, steps=2):
    """The plain model, all examples padded into one batch, dense-gradient SGD."""
    model, _ = _models(keras)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(ids, training=True))
        grads = [tf.convert_to_tensor(g) for g in
                 tape.gradient(loss, model.trainable_variables)]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return model


def _packed_fit(keras, ids, labels, k, strategy=None, steps=2, options=None):
    strategy = strategy or tf.distribute.get_strategy()
    x, y, w = _packed_batch(ids, labels, k * strategy.num_replicas_in_sync)
    with strategy.scope():
        model, packed = _models(keras)
        trainable = accumulate(packed, k)
        trainable.compile(
            optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[packed_accuracy(keras)])
    ds = tf.data.Dataset.from_tensors((x, y, w)).repeat()
    if options is not None:
        ds = ds.with_options(options)
    history = trainable.fit(ds, epochs=steps, steps_per_epoch=1, verbose=0, shuffle=False)
    return model, history


@pytest.mark.parametrize("engine, k", [("keras3", 1), ("keras3", 2), ("tf_keras", 2)])
def test_packed_update_equals_the_plain_models_large_batch_update(engine, k):
    keras = get_keras(engine)
    ids, labels, _ = _examples(20)
    reference = _reference(keras, ids, labels)
    model, history = _packed_fit(keras, ids, labels, k)
    assert max_abs_diff(model, _models(keras)[0]) > 1e-3  # it trained
    assert max_abs_diff(model, reference) <= TOL
    # The accuracy counts each real example once.
    logits = np.asarray(_models(keras)[0](ids))
    assert history.history["accuracy"][0] == pytest.approx(
        np.mean(np.argmax(logits, -1) == labels), abs=1e-6)


def test_packed_update_under_mirrored_strategy_equals_one_device(mirrored):
    keras = get_keras("keras3")
    ids, labels, _ = _examples(20)
    reference = _reference(keras, ids, labels)
    model, _ = _packed_fit(keras, ids, labels, k=2, strategy=mirrored)
    assert max_abs_diff(model, reference) <= TOL


def test_packed_accuracy_counts_each_real_slot_once_and_round_trips():
    keras = get_keras("keras3")
    metric = packed_accuracy(keras)
    y = np.array([[0, 1, 0], [2, 0, 0]])
    logits = np.eye(3)[[[0, 2, 1], [2, 0, 0]]].astype(np.float32)
    weight = np.array([[3.0, 3.0, 0.0], [0.5, 0.0, 0.0]], np.float32)  # two batches' scales
    metric.update_state(y, logits, weight)
    assert float(metric.result()) == pytest.approx(2 / 3)  # 2 of 3 real slots right
    clone = type(metric).from_config(metric.get_config())
    assert clone.name == "accuracy" and type(clone) is type(metric)


def test_packed_twin_config_round_trip():
    keras = get_keras("keras3")
    _, packed = _models(keras)
    clone = keras.Model.from_config(packed.get_config())
    clone.set_weights(packed.get_weights())
    ids, labels, _ = _examples(10)
    x = {"token_ids": None, "segment_ids": None}
    x["token_ids"], x["segment_ids"], _, _ = (t.numpy() for t in pack_window(ids, labels, SLOTS))
    assert np.max(np.abs(np.asarray(clone(x)) - np.asarray(packed(x)))) == 0.0


# ---- the pipeline and the trainer -------------------------------------------------------

def test_packed_splits_hold_every_example_once_in_static_batches(small_jsonl, tmp_path):
    from tf_effitrain.data import prepare_data

    config = tiny_config(small_jsonl, tmp_path, "data.batching=pack", "data.max_segments=8")
    data = prepare_data(config.data, 0, str(tmp_path), train_batch_size=16,
                        train_batch_multiple=2)
    rows = data.packing["train"]["batch_rows"]
    assert rows % 2 == 0 and data.packing["train"]["examples"] == data.split_sizes["train"]
    assert data.train.element_spec[0]["token_ids"].shape == (rows, 32)
    for name, ds in (("train", data.train), ("validation", data.validation),
                     ("test", data.test)):
        count, batches = collections.Counter(), 0
        for x, y, w in ds:
            batches += 1
            assert x["token_ids"].shape[1] == 32 and y.shape[1] == 8
            real = w.numpy() > 0
            # The real slots share `rows x slots`: the weighted mean is the mean loss.
            assert w.numpy().sum() == pytest.approx(w.shape[0] * 8)
            count.update(y.numpy()[real].tolist())
        assert sum(count.values()) == data.split_sizes[name], name
        assert data.packing[name]["real_fraction"] > 0.5
        # Declared from the packed rows, not counted by a pass over the batches.
        assert batches == int(ds.cardinality()) == data.packing[name]["batches"], name
    assert batches == len(list(data.test))


def test_embedded_dataset_packs_95_percent_real_tokens(tmp_path):
    from tf_effitrain.data import prepare_data

    config = load_config(os.path.join(os.path.dirname(FORTUNES), "..", "..", "configs",
                                      "demo_cpu.yaml"),
                         [f"data.path={FORTUNES}", "data.batching=pack"])
    data = prepare_data(config.data, 42, str(tmp_path))
    assert data.packing["train"]["real_fraction"] >= 0.95, data.packing


def test_packed_run_saves_the_plain_model_with_the_same_test_accuracy(small_jsonl, tmp_path):
    from tf_effitrain.training import evaluate_run, train
    from tf_effitrain.runtime.tpu_check import check_tpu_readiness
    from tf_effitrain.data import prepare_data

    # mixed_bfloat16: the packed twin's pooling rounds differently from the plain
    # model's, so the run must report the saved (plain) model's own test figures.
    config = tiny_config(small_jsonl, tmp_path / "run", "data.batching=pack",
                         "data.max_segments=8", "data.token_shuffle=0.2",
                         "training.accumulation_steps=2", "runtime.precision=mixed_bfloat16")
    result = train(config)
    assert result.test is not None and result.precision == "mixed_bfloat16"
    # The saved model takes one example per row; evaluated again it agrees exactly.
    again = evaluate_run(result.run_dir)
    assert again == result.test
    report = open(result.report_path, encoding="utf-8").read()
    assert "Packing:" in report and "of computed tokens real" in report
    keras = get_keras("keras3")
    model = keras.models.load_model(result.model_path)
    assert [i.name for i in model.inputs] == ["token_ids"]
    with_ids = prepare_data(config.data, config.runtime.seed, result.run_dir)
    assert check_tpu_readiness(config, with_ids.train) == []


@pytest.mark.parametrize("sets, message", [
    (["model.kind=bert_backbone"], "has no packed inputs"),
    (["distillation.teacher=runs/x"], "distillation feeds the teacher"),
    (["data.max_segments=64"], "`data.max_segments` must be <= `data.max_length`"),
])
def test_packing_refuses_what_it_cannot_do(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.batching=pack", "data.max_length=32", *sets])


def test_crashed_packed_run_resumes_bitwise(small_jsonl, tmp_path, capsys):
    from test_resume import RESUME, CrashAt, _saved_weights
    from tf_effitrain.training import train

    sets = [*RESUME, "data.batching=pack", "data.max_segments=8", "data.token_shuffle=0.2"]
    whole = train(tiny_config(small_jsonl, tmp_path / "whole", *sets))
    config = tiny_config(small_jsonl, tmp_path / "crashed", *sets)
    with pytest.raises(RuntimeError, match="crash"):
        train(config, plugins=[CrashAt(6)])
    capsys.readouterr()
    resumed = train(config)
    assert "resume: from update" in capsys.readouterr().out
    assert max_abs_diff(_saved_weights(whole.run_dir).values(),
                        _saved_weights(resumed.run_dir).values()) == 0.0
