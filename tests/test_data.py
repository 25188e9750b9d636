import collections
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import DataConfig
from tf_effitrain.data import (
    RESERVED_TOKENS,
    DataError,
    DataWarning,
    batch_dataset,
    default_boundaries,
    load_examples,
    load_or_learn_vocabulary,
    prepare_data,
    split_indices,
    token_shuffle,
)

from harness import fortune_rows, run_python
from harness import write_jsonl as _write_jsonl


# ---- sources ------------------------------------------------------------------------------

def test_jsonl_source_maps_labels_to_sorted_class_names(small_jsonl):
    ex = load_examples(DataConfig(source="jsonl", path=small_jsonl))
    assert ex.class_names == ["computers", "politics", "startrek"]
    assert len(ex) == 90
    assert collections.Counter(ex.labels) == {0: 30, 1: 30, 2: 30}


def test_csv_source_with_custom_fields_and_explicit_classes(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "topic"])
        for r in fortune_rows(per_class=5):
            w.writerow([r["text"], r["label"]])
    ex = load_examples(DataConfig(source="csv", path=str(path), text_field="body",
                                  label_field="topic",
                                  classes=["startrek", "politics", "computers"]))
    assert ex.class_names == ["startrek", "politics", "computers"]
    assert collections.Counter(ex.labels) == {0: 5, 1: 5, 2: 5}
    assert ex.texts[0] == fortune_rows(per_class=5)[0]["text"]


def test_text_dir_source(tmp_path):
    for r_i, r in enumerate(fortune_rows(per_class=4)):
        folder = tmp_path / r["label"]
        folder.mkdir(exist_ok=True)
        (folder / f"{r_i}.txt").write_text(r["text"], encoding="utf-8")
    (tmp_path / "README").write_text("not a class folder")
    ex = load_examples(DataConfig(source="text_dir", path=str(tmp_path)))
    assert ex.class_names == ["computers", "politics", "startrek"]
    assert len(ex) == 12


def test_integer_labels(tmp_path):
    path = _write_jsonl(tmp_path / "i.jsonl", [{"text": "a b", "label": i % 3} for i in range(9)])
    ex = load_examples(DataConfig(path=path))
    assert ex.class_names == ["0", "1", "2"]
    assert ex.labels == [i % 3 for i in range(9)]


@pytest.mark.parametrize("raw, names, labels", [
    ([2019, 2024, 2019], ["2019", "2024"], [0, 1, 0]),       # not 0..K-1: names
    ([1.0, 0.0, 1.0], ["0", "1"], [1, 0, 1]),                # integral floats: indices
    ([True, False, True], ["false", "true"], [1, 0, 1]),     # booleans: names
    (["1", "0", "1"], ["0", "1"], [1, 0, 1]),                # digit strings: indices
    (["b", "a", "b"], ["a", "b"], [1, 0, 1]),
])
def test_labels_are_treated_consistently(tmp_path, raw, names, labels):
    path = _write_jsonl(tmp_path / "l.jsonl", [{"text": f"t{i}", "label": r}
                                                for i, r in enumerate(raw)])
    if names[0] == "2019":
        with pytest.warns(DataWarning, match="are not the indices 0..1: they are used as "
                                             "class names"):
            ex = load_examples(DataConfig(path=path))
    else:
        ex = load_examples(DataConfig(path=path))
    assert (ex.class_names, ex.labels) == (names, labels)


def test_explicit_classes_match_names_before_indices(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": 2024},
                                               {"text": "y", "label": 1},
                                               {"text": "z", "label": "2019"}])
    ex = load_examples(DataConfig(path=path, classes=["2019", "2024"]))
    assert ex.labels == [1, 1, 0]  # "2024" by name, 1 by index


def test_text_dir_errors_name_the_file_or_folder(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "1.txt").write_text(f"text of {label}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*empty' holds no files"):
        load_examples(DataConfig(source="text_dir", path=str(tmp_path)))
    (tmp_path / "empty").rmdir()
    (tmp_path / "b" / "2.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"b/2.txt:1: not valid UTF-8 \(byte 0xe9\)"):
        load_examples(DataConfig(source="text_dir", path=str(tmp_path)))
    with pytest.raises(DataError, match="must be a directory for source 'text_dir'"):
        load_examples(DataConfig(source="text_dir", path=str(tmp_path / "a" / "1.txt")))


def test_reading_examples_needs_no_tensorflow(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "a"},
                                               {"text": "y", "label": "b"}])
    done = run_python(f"""
        import sys
        from tf_effitrain.config import DataConfig
        from tf_effitrain.data import load_examples
        print(len(load_examples(DataConfig(path={path!r}))), "tensorflow" in sys.modules)
    """)
    assert done.stdout.split() == ["2", "False"], done.stderr[-2000:]


def test_a_class_too_small_for_the_held_out_splits_is_warned(tmp_path):
    rows = [{"text": f"a {i}", "label": "a"} for i in range(20)] + [
        {"text": "lonely", "label": "b"}]
    path = _write_jsonl(tmp_path / "w.jsonl", rows)
    with pytest.warns(DataWarning, match=r"'b' \(1 example\) have too few examples for "
                                         r"the validation split"):
        prepare_data(DataConfig(path=path, vocab_size=60), run_dir=str(tmp_path))


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        ex = load_examples(DataConfig(source="tfds", tfds_name="imdb_reviews",
                                      tfds_split="train"))
    assert ex.class_names == ["neg", "pos"]
    assert len(ex) == 40
    assert all(isinstance(t, str) for t in ex.texts)
    assert set(ex.labels) <= {0, 1}


def test_tfds_source_end_to_end_pipeline(tmp_path):
    import tensorflow_datasets as tfds

    cfg = DataConfig(source="tfds", tfds_name="imdb_reviews", vocab_size=200,
                     max_length=32, batch_size=8)
    with tfds.testing.mock_data(num_examples=60):
        bundle = prepare_data(cfg, seed=1, run_dir=str(tmp_path))
    assert sum(bundle.split_sizes.values()) == 60
    ids, labels = next(iter(bundle.train))
    assert ids.dtype == tf.int32 and ids.shape[1] <= 32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: DataConfig(path=str(p / "missing.jsonl")), "JSONL file not found"),
        (lambda p: DataConfig(source="csv", path=str(p / "missing.csv")), "CSV file not found"),
        (lambda p: DataConfig(source="text_dir", path=str(p / "nodir")), "Text directory not found"),
        (lambda p: DataConfig(path=_write_jsonl(p / "e.jsonl", [])), "No examples found"),
        (lambda p: DataConfig(path=_write_jsonl(p / "o.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "zz"}]),
                              classes=["a", "b"]), "label 'zz' is out of range"),
        (lambda p: DataConfig(path=_write_jsonl(p / "n.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 5}]),
                              classes=["a", "b"]), "n.jsonl:2: label 5 is out of range"),
        (lambda p: DataConfig(path=_write_jsonl(p / "null.jsonl", [{"text": "x", "label": "a"}, {"text": None, "label": "b"}])),
         "null.jsonl:2: `text` is null, not text"),
        (lambda p: DataConfig(path=_write_jsonl(p / "nl.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": None}])),
         "nl.jsonl:2: label null is not a class name"),
        (lambda p: DataConfig(path=_write_jsonl(p / "half.jsonl", [{"text": "x", "label": 0.5}, {"text": "y", "label": 1}])),
         "half.jsonl:1: label 0.5 is not a class name"),
        (lambda p: DataConfig(path=_write_jsonl(p / "list.jsonl", [["x", "a"]])), "expected a JSON object per line"),
        (lambda p: DataConfig(path=_write_jsonl(p / "m.jsonl", [{"txt": "x", "label": 0}])), "no `text` text field"),
        (lambda p: DataConfig(path=_write_jsonl(p / "one.jsonl", [{"text": "x", "label": "a"}])), "at least 2 classes"),
    ],
)
def test_bad_data_fails_with_a_clear_message(tmp_path, make, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_examples(make(tmp_path))


def test_malformed_jsonl_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(DataConfig(path=str(path)))


def test_tfds_unknown_dataset_does_not_download():
    with pytest.raises(DataError, match="without downloading"):
        load_examples(DataConfig(source="tfds", tfds_name="no_such_dataset_xyz"))


# ---- splits -------------------------------------------------------------------------------

def test_splits_are_deterministic_stratified_partitions():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    a = split_indices(labels, 0.1, 0.2, seed=3)
    b = split_indices(labels, 0.1, 0.2, seed=3)
    c = split_indices(labels, 0.1, 0.2, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    together = np.concatenate(list(a.values()))
    assert sorted(together) == list(range(100))
    test_counts = collections.Counter(np.asarray(labels)[a["test"]])
    assert test_counts == {0: 10, 1: 6, 2: 4}


def test_empty_training_split_is_an_error(tmp_path):
    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(6)]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    # Per class of 3: round(0.5 * 3) = 2 test, round(0.34 * 3) = 1 validation, 0 train.
    with pytest.raises(DataError, match="training split is empty"):
        prepare_data(DataConfig(path=path, val_fraction=0.34, test_fraction=0.5),
                     run_dir=str(tmp_path))


# ---- batching -----------------------------------------------------------------------------

def _ragged_dataset(lengths, seed=0):
    rng = np.random.RandomState(seed)
    seqs = [rng.randint(1, 50, size=n).astype("int32") for n in lengths]

    def gen():
        for i, s in enumerate(seqs):
            yield s, np.int32(i)

    spec = (tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32))
    return tf.data.Dataset.from_generator(gen, output_signature=spec), seqs


@pytest.mark.parametrize("batching", ["bucket", "fixed"])
def test_batching_loses_and_duplicates_nothing(batching):
    lengths = np.random.RandomState(1).randint(1, 65, size=203)
    ds, seqs = _ragged_dataset(lengths)
    seen = []
    for ids, idx in batch_dataset(ds, batching, 16, max_length=64):
        if batching == "fixed":
            assert ids.shape[1] == 64
        for row, i in zip(ids.numpy(), idx.numpy()):
            n = len(seqs[i])
            np.testing.assert_array_equal(row[:n], seqs[i])
            assert not row[n:].any()  # padded with 0 only
            seen.append(int(i))
    assert sorted(seen) == list(range(len(seqs)))


@pytest.mark.parametrize("batching", ["bucket", "fixed"])
def test_batching_keeps_per_example_features_with_their_example(batching):
    """Dict inputs (token ids + a fixed-shape feature such as teacher logits) batch like
    plain ids, each feature row staying with its example."""
    lengths = np.random.RandomState(3).randint(1, 65, size=57)
    ds, seqs = _ragged_dataset(lengths)

    def with_feature(ids, i):
        return {"token_ids": ids, "teacher_logits": tf.cast(tf.stack([i, -i]), tf.float32)}, i

    for x, idx in batch_dataset(ds.map(with_feature), batching, 8, max_length=64):
        assert x["teacher_logits"].shape[1:] == [2]
        if batching == "fixed":
            assert x["token_ids"].shape[1] == 64
        for row, feature, i in zip(x["token_ids"].numpy(), x["teacher_logits"].numpy(),
                                   idx.numpy()):
            np.testing.assert_array_equal(row[:len(seqs[i])], seqs[i])
            assert feature.tolist() == [i, -i]


def test_buckets_group_similar_lengths():
    lengths = np.random.RandomState(2).randint(1, 129, size=400)
    ds, seqs = _ragged_dataset(lengths)
    boundaries = default_boundaries(128)
    assert boundaries == [16, 32, 64]
    padded_tokens = real_tokens = 0
    for ids, idx in batch_dataset(ds, "bucket", 32, max_length=128):
        lens = [len(seqs[i]) for i in idx.numpy()]
        buckets = {int(np.searchsorted(boundaries, n, side="right")) for n in lens}
        assert len(buckets) == 1  # one bucket per batch
        padded_tokens += ids.shape[0] * ids.shape[1]
        real_tokens += sum(lens)
    assert padded_tokens < 400 * 128 * 0.75  # far less padding than fixed length


def test_fixed_batching_with_drop_remainder_has_static_shapes():
    ds, _ = _ragged_dataset([5] * 21)
    batched = batch_dataset(ds, "fixed", 8, max_length=12, drop_remainder=True)
    assert batched.element_spec[0].shape.as_list() == [8, 12]
    assert sum(1 for _ in batched) == 2


def test_token_shuffle_keeps_tokens_and_changes_order():
    ids = tf.range(1, 41, dtype=tf.int32)
    tf.random.set_seed(0)
    out = [token_shuffle(ids, 1.0).numpy() for _ in range(5)]
    assert all(sorted(o) == list(range(1, 41)) for o in out)
    assert any(not np.array_equal(o, ids.numpy()) for o in out)
    np.testing.assert_array_equal(token_shuffle(ids, 0.0).numpy(), ids.numpy())
    with pytest.raises(ValueError, match="`prob` must be in"):
        token_shuffle(ids, 1.5)


# ---- tokenizer and the whole pipeline ------------------------------------------------------

def test_vocabulary_is_learned_once_and_cached(tmp_path, small_jsonl):
    texts = load_examples(DataConfig(path=small_jsonl)).texts
    path = str(tmp_path / "vocab.txt")
    vocab = load_or_learn_vocabulary(path, texts, vocab_size=300)
    assert vocab[: len(RESERVED_TOKENS)] == RESERVED_TOKENS
    assert os.path.isfile(path)
    # A second call reads the file: it does not need the texts at all.
    assert load_or_learn_vocabulary(path, [], vocab_size=300) == vocab


def test_prepare_data_end_to_end(tmp_path, small_jsonl):
    cfg = DataConfig(path=small_jsonl, vocab_size=300, max_length=24, batch_size=8,
                     token_shuffle=0.5)
    bundle = prepare_data(cfg, seed=0, run_dir=str(tmp_path))
    assert bundle.split_sizes == {"train": 72, "validation": 9, "test": 9}
    assert bundle.class_names == ["computers", "politics", "startrek"]
    train_labels = []
    for ids, labels in bundle.train:
        assert ids.dtype == tf.int32 and ids.shape[1] <= 24
        assert int(tf.reduce_max(ids)) < len(bundle.vocab)
        train_labels += labels.numpy().tolist()
    assert len(train_labels) == 72
    # The declared batch count holds for every (reshuffled) epoch and every split.
    assert int(bundle.train.cardinality()) == bundle.train_batches
    assert bundle.train_batches == sum(1 for _ in bundle.train) == sum(1 for _ in bundle.train)
    for split in (bundle.validation, bundle.test):
        assert int(split.cardinality()) == sum(1 for _ in split) > 0
    assert bundle.majority_baseline == pytest.approx(3 / 9)
    assert os.path.isfile(tmp_path / "vocab.txt")
    # Same seed, same splits: the test split holds the same examples again.
    again = prepare_data(cfg, seed=0, run_dir=str(tmp_path))
    first = sorted(map(tuple, (r.tolist() for ids, _ in bundle.test for r in ids.numpy())))
    second = sorted(map(tuple, (r.tolist() for ids, _ in again.test for r in ids.numpy())))
    assert first == second


def test_max_examples_subsamples_deterministically(tmp_path, small_jsonl):
    cfg = DataConfig(path=small_jsonl, vocab_size=200, max_examples=30, val_fraction=0.0,
                     test_fraction=0.2)
    bundle = prepare_data(cfg, seed=0, run_dir=str(tmp_path))
    assert sum(bundle.split_sizes.values()) == 30
    assert bundle.validation is None


def test_unicode_line_separators_bom_and_multiline_csv(tmp_path):
    # U+2028 inside a JSON string is valid JSON; only "\n" separates records.
    path = tmp_path / "u.jsonl"
    path.write_text('{"text": "one\u2028two", "label": "a"}\n{"text": "x", "label": "b"}\n',
                    encoding="utf-8")
    assert load_examples(DataConfig(path=str(path))).texts[0] == "one\u2028two"
    # A byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\nhello,a\nworld,b\n".encode("utf-8-sig"))
    assert load_examples(DataConfig(source="csv", path=str(path))).texts == ["hello", "world"]
    path = tmp_path / "bom.jsonl"
    path.write_bytes('{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n'.encode(
        "utf-8-sig"))
    assert len(load_examples(DataConfig(path=str(path)))) == 2
    # Errors name the first line of a record whose quoted field spans lines.
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"two\nlines",a\n"three\nmore\nlines",b\n,\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"multi.csv:7: label '' |multi.csv:7"):
        load_examples(DataConfig(source="csv", path=str(path), classes=["a", "b"]))


@pytest.mark.parametrize("raw", ["--1", "\u00b2", "007"])
def test_strings_that_are_not_canonical_integers_are_names(tmp_path, raw):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": raw},
                                               {"text": "y", "label": "b"}])
    assert load_examples(DataConfig(path=path)).class_names == sorted([raw, "b"])
