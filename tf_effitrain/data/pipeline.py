"""From a `DataConfig` to batched train / validation / test `tf.data` pipelines."""

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import tensorflow as tf

from tf_effitrain.data.augment import token_shuffle
from tf_effitrain.data.batching import batch_dataset
from tf_effitrain.data.sources import DataError, load_examples
from tf_effitrain.data.splits import split_indices
from tf_effitrain.data.tokenizer import load_or_learn_vocabulary, make_tokenizer

__all__ = ["DataBundle", "check_split_classes", "prepare_data", "select_and_split",
           "segments_shuffled", "tokenize_dataset", "tokenize_examples",
           "tokens_shuffled", "unpacked", "VOCAB_FILE"]

VOCAB_FILE = "vocab.txt"


@dataclass
class DataBundle:
    """Batched splits plus what the model and the report need to know about them.

    Args:
        train: `tf.data.Dataset` of `(token_ids, labels)` batches, shuffled per epoch.
        validation: the validation batches, or None when `val_fraction` is 0.
        test: the test batches, or None when `test_fraction` is 0.
        vocab: list of str. WordPiece vocabulary; id 0 is `[PAD]`.
        class_names: list of str.
        split_sizes: dict. Examples per split.
        train_batches: int. Batches in one pass over the training split.
        majority_baseline: float or None. Test accuracy of always predicting the
            most frequent training class.
        packing: dict or None. With `batching: pack`: per split, `examples`, `rows`,
            `batch_rows` and `real_fraction` (real tokens / computed tokens); the
            batches are `({"token_ids", "segment_ids"}, labels, sample_weight)`
            (see `tf_effitrain.data.packing`).
        plain_test: With `batching: pack`, the test split in length buckets of one
            example per row, for the plain (saved) model; else None.
        class_weights: list of float or None. With `data.class_weight: balanced`, the
            weight of each class; the training batches then carry sample weights
            (`tf_effitrain.data.weights`).
        train_fn: callable or None. With `data.stream: true`, builds the training
            batches of one input pipeline from a `tf.distribute.InputContext`: its own
            files (`tf_effitrain.data.stream.pipeline_files`), in per-replica batches;
            for `strategy.distribute_datasets_from_function`. `train` is
            `train_fn(None)`.
    """

    train: tf.data.Dataset
    validation: Optional[tf.data.Dataset]
    test: Optional[tf.data.Dataset]
    vocab: List[str]
    class_names: List[str]
    split_sizes: Dict[str, int] = field(default_factory=dict)
    train_batches: int = 0
    majority_baseline: Optional[float] = None
    packing: Optional[Dict[str, Dict[str, float]]] = None
    plain_test: Optional[tf.data.Dataset] = None
    class_weights: Optional[List[float]] = None
    train_fn: Optional[Callable] = None


def tokenize_dataset(texts, labels, tokenizer, max_length):
    """Unbatched dataset of `(int32 token ids truncated to max_length, int32 label)`."""
    ds = tf.data.Dataset.from_tensor_slices((list(texts), tf.constant(labels, tf.int32)))
    return tokenize_examples(ds, tokenizer, max_length)


def tokenize_examples(ds, tokenizer, max_length):
    """`(text, label)` examples -> `(int32 token ids truncated to max_length, label)`,
    tokenized in parallel batches of 512 (much faster than per string), in order."""
    # Named functions, not lambdas: autograph cannot read the source of a lambda that
    # shares its call with other arguments, and warns on every run.
    def tokenize(text, label):
        return tokenizer(text)[:, :max_length], label

    def dense(ids, label):
        # Unbatching ragged rows gives rank-1 ragged specs; make them plain tensors.
        return tf.reshape(ids, [-1]), label

    ds = ds.batch(512).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.unbatch().map(dense)


def tokens_shuffled(ds, prob):
    """`(ids, label)` training examples with `data.token_shuffle` applied (`ds` itself
    when `prob` is 0)."""
    if not prob:
        return ds

    def augment(ids, label):
        return token_shuffle(ids, prob), label

    return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)


def segments_shuffled(rows, prob):
    """Packed training rows with `data.token_shuffle` applied per segment (`rows`
    itself when `prob` is 0)."""
    if not prob:
        return rows
    from tf_effitrain.data.packing import shuffle_segments

    def augment(ids, segments, labels, mask):
        return shuffle_segments(ids, segments, prob), segments, labels, mask

    return rows.map(augment, num_parallel_calls=tf.data.AUTOTUNE)


def _counted(ds):
    """`ds` with its number of batches declared, and that number.

    Keras 3 otherwise learns a dataset's end only by running out of it (and warns that
    the input ran out of data). The count is the same every epoch: a batch's bucket
    depends only on sequence lengths, not on the shuffled order.
    """
    def add_one(count, _):
        return count + 1

    n = int(ds.reduce(0, add_one))
    return ds.apply(tf.data.experimental.assert_cardinality(n)), n


def _described(class_counts, class_names, missing):
    total = [sum(counts[c] for counts in class_counts.values())
             for c in range(len(class_names))]
    return ", ".join(f"{class_names[c]!r} ({total[c]} example"
                     f"{'s' if total[c] != 1 else ''})" for c in missing[:5])


def check_split_classes(class_counts, class_names, data_cfg):
    """A class with examples but none for training is an error (it cannot be learned);
    one missing from a held-out split is a warning.

    Args:
        class_counts: dict. `{split: [examples of each class]}`.
        class_names: list of str.
        data_cfg: `DataConfig`.
    """
    import warnings

    from tf_effitrain.errors import DataWarning

    present = [c for c in range(len(class_names))
               if any(counts[c] for counts in class_counts.values())]
    missing = [c for c in present if not class_counts["train"][c]]
    if missing:
        raise DataError(
            f"Class(es) {_described(class_counts, class_names, missing)} have too few "
            f"examples to split: none is left for training (val_fraction="
            f"{data_cfg.val_fraction}, test_fraction={data_cfg.test_fraction}). Add "
            "examples, merge the class, or lower the fractions.")
    for split, fraction in (("validation", data_cfg.val_fraction),
                            ("test", data_cfg.test_fraction)):
        if not sum(class_counts[split]):
            continue
        missing = [c for c in present if not class_counts[split][c]]
        if missing:
            warnings.warn(
                f"Class(es) {_described(class_counts, class_names, missing)} have too few"
                f" examples for the {split} split "
                f"(`data.{'val' if split == 'validation' else 'test'}_fraction` "
                f"{fraction}): they are trained on but never "
                f"{'validated' if split == 'validation' else 'tested'}. "
                "Add examples or merge the class.", DataWarning, stacklevel=3)


def _with_features(ds, features):
    """`((ids, label), row of features)` -> `({"token_ids": ids, **features}, label)`."""
    def merge(example, row):
        ids, label = example
        return {"token_ids": ids, **row}, label

    return tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(features))).map(merge)


def unpacked(data_cfg):
    """`data_cfg` with `batching: pack` replaced by `bucket`: the batches of the plain
    (one example per row) model, for code that feeds it directly (evaluation of a saved
    model, export calibration, scoring)."""
    import dataclasses

    if data_cfg.batching != "pack":
        return data_cfg
    return dataclasses.replace(data_cfg, batching="bucket")


def _packed_splits(data_cfg, tokenized, seed, batch_sizes, multiples, align):
    """Packs each split once (cached), then shuffles the training rows every epoch.

    Packing once gives every epoch the same number of batches (an epoch stays one
    pass, and a resumed run finds the same stream); the training examples are mixed once
    before packing, then rows, not examples, are shuffled each epoch: row-mates only
    share a batch, never attention.
    """
    from tf_effitrain.data.packing import batch_packed, pack_examples, rows_per_batch

    length, slots = data_cfg.max_length, data_cfg.segments_per_row
    batches, stats = {}, {}
    for name, (ds, count) in tokenized.items():
        if name == "train":
            # Files are often sorted (by class, by date): mix the examples once, so that
            # a row's (and a window's) examples are a sample of the whole split.
            ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=False)
        rows = pack_examples(ds, length, slots, align).cache()

        def add_tokens(total, row):
            return total + tf.stack([1, tf.reduce_sum(tf.cast(row[1] > 0, tf.int32))])

        num_rows, tokens = (int(v) for v in rows.reduce(tf.constant([0, 0]), add_tokens))
        batch_rows = rows_per_batch(batch_sizes[name], count, num_rows, multiples[name])
        stats[name] = {"examples": count, "rows": num_rows, "batch_rows": batch_rows,
                       "real_fraction": tokens / max(1, num_rows * length),
                       # The last batch is completed with empty rows, never dropped.
                       "batches": -(-num_rows // batch_rows)}
        if name == "train":
            rows = rows.shuffle(min(data_cfg.shuffle_buffer, num_rows), seed=seed,
                                reshuffle_each_iteration=True)
            rows = segments_shuffled(rows, data_cfg.token_shuffle)
        batches[name] = batch_packed(rows, batch_rows, length, slots).prefetch(
            tf.data.AUTOTUNE)
    return batches, stats


def select_and_split(examples, data_cfg, seed):
    """`(order, parts)`: the kept examples' indices (all, or a seeded sample of
    `max_examples`, in file order) and `{split: positions in order}`, stratified or
    from the source's own split tags."""
    import numpy as np

    order = list(range(len(examples)))
    if data_cfg.max_examples is not None and data_cfg.max_examples < len(order):
        permutation = np.random.RandomState(seed).permutation(len(order))
        order = sorted(permutation[: data_cfg.max_examples])
    if examples.splits is None:
        labels = [examples.labels[i] for i in order]
        return order, split_indices(labels, data_cfg.val_fraction,
                                    data_cfg.test_fraction, seed)
    tags = np.asarray([examples.splits[i] for i in order], dtype=object)
    return order, {name: np.flatnonzero(tags == name).astype(np.int64)
                   for name in ("train", "validation", "test")}


def prepare_data(data_cfg, seed=42, run_dir=None, train_batch_size=None,
                 eval_batch_size=None, examples=None, train_features=None,
                 train_batch_multiple=1, eval_batch_multiple=1, pack_align=1, log=None):
    """Loads, splits, tokenizes and batches the configured data.

    The vocabulary is learned on the training split only and cached as
    `run_dir/vocab.txt`; a second call with the same `run_dir` reuses it.

    Args:
        data_cfg: `DataConfig`.
        seed: int. Split, shuffle and augmentation seed.
        run_dir: str or None. Where the vocabulary is cached.
        train_batch_size: int or None. Batch size of the training split (default
            `data_cfg.batch_size`); with gradient accumulation the trainer feeds
            effective batches of `batch_size x accumulation_steps`.
        eval_batch_size: int or None. Batch size of the validation and test splits
            (default `data_cfg.batch_size`).
        examples: `Examples` or None. Already loaded examples of `data_cfg` (the
            trainer reads them first, to report bad data before anything heavy); with
            `data.stream: true`, a `StreamInfo` from `tf_effitrain.data.stream.scan`.
        train_features: callable or None. Called once with the unbatched, tokenized
            training split (`(token_ids, label)` in a fixed order); returns a dict of
            per-example arrays `[examples, ...]` in that order (e.g. a teacher's
            logits). The training batches' inputs then become
            `{"token_ids": ids, **features}`. Incompatible with `token_shuffle`
            and `batching: pack`.
        train_batch_multiple: int. `batching: pack`: training batches hold a multiple
            of this many rows (replicas x accumulation steps: each micro-batch on each
            replica gets whole rows).
        eval_batch_multiple: int. The same for the validation and test batches
            (replicas).
        pack_align: int. `batching: pack`: each example starts at a multiple of this
            (block-sparse attention's `block_size`).
        log: callable or None. Progress lines (learning the vocabulary).

    Returns:
        A `DataBundle`.

    Example:

    ```python
    data = et.prepare_data(et.DataConfig(path="data/fortunes/fortunes.jsonl"),
                           seed=0, run_dir="runs/x")
    model.fit(data.train, validation_data=data.validation)
    ```
    """
    if data_cfg.stream:
        from tf_effitrain.data.stream import prepare_stream

        return prepare_stream(
            data_cfg, seed=seed, run_dir=run_dir, train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size, train_features=train_features,
            train_batch_multiple=train_batch_multiple,
            eval_batch_multiple=eval_batch_multiple, pack_align=pack_align, log=log,
            info=examples)
    if examples is None:
        examples = load_examples(data_cfg)
    order, parts = select_and_split(examples, data_cfg, seed)
    labels = [examples.labels[i] for i in order]
    if len(parts["train"]) == 0:
        raise DataError(
            f"The training split is empty ({len(order)} examples, val_fraction="
            f"{data_cfg.val_fraction}, test_fraction={data_cfg.test_fraction}). Add data "
            "or lower them."
        )
    check_split_classes(
        {name: [int(v) for v in np.bincount(np.asarray(labels, np.int64)[idx],
                                            minlength=len(examples.class_names))]
         for name, idx in parts.items()}, examples.class_names, data_cfg)

    def subset(name):
        idx = [order[i] for i in parts[name]]
        return [examples.texts[i] for i in idx], [examples.labels[i] for i in idx]

    train_texts, train_labels = subset("train")
    vocab_path = os.path.join(run_dir, VOCAB_FILE) if run_dir else None
    vocab = load_or_learn_vocabulary(
        vocab_path, train_texts, data_cfg.vocab_size, data_cfg.lowercase,
        learner=data_cfg.vocab_learner, sample=data_cfg.vocab_sample, seed=seed,
        vocab_file=data_cfg.vocab_file, cache=data_cfg.vocab_cache, log=log)
    tokenizer = make_tokenizer(vocab, data_cfg.lowercase)

    train_batch_size = train_batch_size or data_cfg.batch_size
    eval_batch_size = eval_batch_size or data_cfg.batch_size

    if train_features is not None and data_cfg.batching == "pack":
        raise DataError(
            "Per-example training features (e.g. precomputed teacher logits) cannot be "
            "combined with `data.batching: pack`. Use `data.batching: bucket`.")
    if train_features is not None and data_cfg.token_shuffle:
        raise DataError(
            "Per-example training features (e.g. precomputed teacher logits) cannot be "
            "combined with `data.token_shuffle` > 0: the shuffled tokens would no longer "
            "match them. Set `data.token_shuffle: 0`.")

    def batched(texts, labels, train, batching=data_cfg.batching):
        ds = tokenize_dataset(texts, labels, tokenizer, data_cfg.max_length).cache()
        if train and train_features is not None:
            # Not cached again: the ids are cached above, the features are in memory.
            ds = _with_features(ds, train_features(ds))
        if train:
            ds = ds.shuffle(min(data_cfg.shuffle_buffer, len(texts)), seed=seed,
                            reshuffle_each_iteration=True)
            ds = tokens_shuffled(ds, data_cfg.token_shuffle)
        ds = batch_dataset(ds, batching,
                           train_batch_size if train else eval_batch_size,
                           data_cfg.max_length, data_cfg.bucket_boundaries,
                           data_cfg.drop_remainder and train)
        return ds.prefetch(tf.data.AUTOTUNE)

    names = [name for name in ("train", "validation", "test") if len(parts[name])]
    # The one pass before training: tokenize (in parallel, cached), pack, count batches.
    log = log or (lambda line: None)
    total = sum(len(parts[name]) for name in names)
    log(f"data: tokenizing {total:,} examples ("
        + ("packing and " if data_cfg.batching == "pack" else "") + "counting batches)")
    started = time.perf_counter()
    packing = None
    if data_cfg.batching == "pack":
        tokenized = {}
        for name in names:
            texts, split_labels = subset(name)
            tokenized[name] = (tokenize_dataset(texts, split_labels, tokenizer,
                                                data_cfg.max_length), len(texts))
        pipelines, packing = _packed_splits(
            data_cfg, tokenized, seed,
            {"train": train_batch_size, "validation": eval_batch_size,
             "test": eval_batch_size},
            {"train": train_batch_multiple, "validation": eval_batch_multiple,
             "test": eval_batch_multiple}, pack_align)
    else:
        pipelines = {name: batched(*subset(name), train=name == "train") for name in names}
    class_weights = None
    if data_cfg.class_weight == "balanced":
        from tf_effitrain.data.weights import balanced_class_weights, class_weighted

        class_weights = balanced_class_weights(train_labels, len(examples.class_names))
        pipelines["train"] = class_weighted(pipelines["train"], class_weights)
    if packing is not None and "test" in pipelines:
        # The saved model's own test figures: one example per row, bucketed.
        pipelines["plain_test"] = batched(*subset("test"), train=False, batching="bucket")
    splits = {"validation": None, "test": None, "plain_test": None}
    counts = {}
    for name in pipelines:
        if packing is not None and name in packing:  # counted while packing
            counts[name] = packing[name]["batches"]
            splits[name] = pipelines[name].apply(
                tf.data.experimental.assert_cardinality(counts[name]))
        else:
            splits[name], counts[name] = _counted(pipelines[name])
    train_batches = counts["train"]
    log(f"data: ready in {time.perf_counter() - started:.1f} s")
    if train_batches == 0:
        raise DataError(
            f"The training split ({len(train_texts)} examples) gives no full batch of "
            f"{train_batch_size} with `drop_remainder: true`. Lower `data.batch_size` "
            "(or `training.accumulation_steps`)."
        )
    test_labels = subset("test")[1]
    majority = None
    if test_labels:
        top = Counter(train_labels).most_common(1)[0][0]
        majority = sum(1 for y in test_labels if y == top) / len(test_labels)
    return DataBundle(
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        vocab=vocab,
        class_names=examples.class_names,
        split_sizes={k: int(len(v)) for k, v in parts.items()},
        train_batches=train_batches,
        majority_baseline=majority,
        packing=packing,
        plain_test=splits["plain_test"],
        class_weights=class_weights,
    )
