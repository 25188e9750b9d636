"""Streaming data: the corpus is read from its files every epoch, never held in memory.

`scan` reads every record once, in Python, before anything heavy. It checks texts and
labels and raises the same errors `load_examples` does, counts the examples of each
split and class, and keeps a seeded uniform sample of the training texts (reservoir
sampling) for the vocabulary. Its memory is the sample plus one counter per class.

Training then reads the files through `tf.data`. Files are interleaved, and each
example's split comes from its file group (`data.split: files`) or from a hash of its
text (`data.split: hash`). Tokenization runs in parallel inside the pipeline. Nothing
tokenizes the corpus up front, and nothing counts batches. The number of updates in an
epoch is exact for `batching: fixed`. For `bucket` and `pack` it is estimated from the
token lengths of the sample (within a few percent), and the trainer's epoch is that
many updates of the endlessly repeated, reshuffled stream.

With several input pipelines (workers), `stream_examples(input_context=...)` gives each
one its own files when there are at least as many files as pipelines: the effect of
`AutoShardPolicy.FILE`, with no file read twice. With fewer files, every pipeline reads
all of them and keeps every n-th example (data sharding).
"""

import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from tf_effitrain.data.sources import (
    DataError,
    label_index,
    source_name,
    split_files,
    tagged_records,
)

__all__ = ["StreamInfo", "scan", "stream_examples", "pipeline_files", "estimate_batches",
           "prepare_stream"]

SPLITS = ("train", "validation", "test")

_CHUNK = 256  # examples per element a file's reader yields

# Training texts whose token lengths estimate the batches per epoch: the estimate's
# relative error is about 1 / sqrt(2000), ~2%.
LENGTH_SAMPLE = 2000


@dataclass
class StreamInfo:
    """What one pass over a streamed source learned.

    Args:
        class_names: list of str.
        label_map: dict. Raw label (int or str) -> class index.
        files: dict. `{split: files}` with `data.split: files`, else `{None: files}`
            (`{None: None}` for sources that are not files).
        counts: dict. `{split: examples}`.
        class_counts: dict. `{split: [examples of each class]}`.
        sample: list of str. A seeded uniform sample of the training texts.
    """

    class_names: List[str]
    label_map: Dict
    files: Dict
    counts: Dict[str, int]
    class_counts: Dict[str, List[int]]
    sample: List[str]

    def __len__(self):
        return sum(self.counts.values())

    def files_of(self, split):
        """The files `split` is read from (None for sources that are not files)."""
        if None in self.files:
            return self.files[None]
        if split not in self.files:
            raise DataError(f"The {split} split has no files: set `data.{split}_path`.")
        return self.files[split]


def scan(cfg, seed=0, sample_size=None, log=None):
    """Reads every record once: checks, counts and samples (see the module docstring).

    Args:
        cfg: `DataConfig` with `split_method` `"hash"` or `"files"`.
        seed: int. Seeds the sample of training texts.
        sample_size: int or None. Training texts to keep; default `cfg.vocab_sample`
            (None: all of them).
        log: callable or None. Progress lines, every few seconds.

    Returns:
        `StreamInfo`.

    Raises:
        DataError: what `load_examples` raises, and an empty training split.
        ConfigError: an inconsistent `cfg` (`DataConfig.validate`).
    """
    cfg.validate()  # a config built in code has not been checked yet
    if cfg.split_method not in ("hash", "files"):
        raise DataError("A streamed source needs `data.split: hash` or `files`. "
                        f"Received: data.split={cfg.split!r}")
    sample_size = cfg.vocab_sample if sample_size is None else sample_size
    rng = random.Random(seed)
    counts = {name: Counter() for name in SPLITS}
    where_of, sample, seen, total = {}, [], 0, 0
    files = split_files(cfg)
    started = last = time.perf_counter()
    for split, group in files.items():
        for tag, text, label, where in tagged_records(cfg, group, split):
            total += 1
            counts[tag][label] += 1
            where_of.setdefault(label, where)
            if tag == "train":
                seen += 1
                # Reservoir sampling (Algorithm R): a uniform sample in one pass.
                if sample_size is None or len(sample) < sample_size:
                    sample.append(text)
                else:
                    j = rng.randrange(seen)
                    if j < sample_size:
                        sample[j] = text
            if log and total % 20000 == 0 and time.perf_counter() - last > 5:
                last = time.perf_counter()
                log(f"data: checked {total:,} examples ({last - started:.0f} s)")
    if not where_of:
        raise DataError(
            f"No examples found for source {cfg.source!r} at {source_name(cfg)!r}.")
    class_names, mapping = label_index(where_of, cfg.classes, where_of, source_name(cfg))
    class_counts = {}
    for name in SPLITS:
        per_class = [0] * len(class_names)
        for label, n in counts[name].items():
            per_class[mapping[label]] += n
        class_counts[name] = per_class
    info = StreamInfo(class_names=class_names, label_map=mapping, files=files,
                      counts={name: sum(class_counts[name]) for name in SPLITS},
                      class_counts=class_counts, sample=sample)
    total = [sum(class_counts[name][c] for name in SPLITS)
             for c in range(len(class_names))]
    if sum(1 for n in total if n) < 2:
        raise DataError(
            f"All {len(info)} examples are of one class: a classifier needs examples of "
            "at least 2 classes. Check `data.label_field`.")
    if not info.counts["train"]:
        raise DataError(
            f"The training split is empty ({len(info)} examples, split "
            f"{cfg.split_method!r}). Add training data or lower the fractions.")
    return info


def pipeline_files(files, input_context=None):
    """`(files, by_file)`: the files one input pipeline reads, and whether it reads them
    whole (`AutoShardPolicy.FILE`: with at least as many files as pipelines, pipeline
    `i` of `n` reads `files[i::n]`) or keeps every n-th example of all of them."""
    num, index = ((input_context.num_input_pipelines, input_context.input_pipeline_id)
                  if input_context is not None else (1, 0))
    if files is not None and num > 1 and len(files) >= num:
        return files[index::num], True
    return files, False


def stream_examples(cfg, info, split, input_context=None):
    """`(text, int32 label)` examples of one split, read from the files as a stream.

    Args:
        cfg: `DataConfig`.
        info: `StreamInfo` from `scan(cfg)`.
        split: str. `"train"`, `"validation"` or `"test"`.
        input_context: `tf.distribute.InputContext` or None. This pipeline's share:
            its own files when there are enough, else every n-th example
            (`pipeline_files`).

    Returns:
        `tf.data.Dataset`, in the same order on every pass.
    """
    files = info.files_of(split)
    group = split if cfg.split_method == "files" else None
    mapping = info.label_map

    def records(path=None):
        # Chunks, not single examples: each element a generator yields costs a trip
        # through the Python interpreter lock; `unbatch` below splits them in C++.
        paths = None if path is None else [path.decode() if isinstance(path, bytes)
                                           else str(path)]
        texts, labels = [], []
        for tag, text, label, where in tagged_records(cfg, paths, group):
            if tag != split:
                continue
            if label not in mapping:
                raise DataError(f"{where}: label {label!r} was not in the data when it "
                                "was checked: did the files change during the run?")
            texts.append(text)
            labels.append(mapping[label])
            if len(texts) == _CHUNK:
                yield np.array(texts, dtype=object), np.array(labels, np.int32)
                texts, labels = [], []
        if texts:
            yield np.array(texts, dtype=object), np.array(labels, np.int32)

    spec = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32))
    num, index = ((input_context.num_input_pipelines, input_context.input_pipeline_id)
                  if input_context is not None else (1, 0))
    files, by_file = pipeline_files(files, input_context)
    if files is None:  # tfds, text_dir: one reader
        ds = tf.data.Dataset.from_generator(records, output_signature=spec).unbatch()
    else:
        def read(path):
            return tf.data.Dataset.from_generator(records, args=(path,),
                                                  output_signature=spec)

        ds = tf.data.Dataset.from_tensor_slices(files).interleave(
            read, cycle_length=min(len(files), 4)).unbatch()
    return ds.shard(num, index) if num > 1 and not by_file else ds


def _tokenized_sample(texts, tokenizer, max_length):
    """`texts` tokenized exactly as in training, as a dataset of `(ids, 0)`."""
    from tf_effitrain.data.pipeline import tokenize_examples

    labels = tf.zeros([len(texts)], tf.int32)
    return tokenize_examples(tf.data.Dataset.from_tensor_slices((texts, labels)),
                             tokenizer, max_length)


def estimate_batches(cfg, n, batch_size, lengths, drop_remainder=False,
                     rows_per_example=None, batch_rows=None):
    """Batches in one pass over `n` examples (exact for `fixed`, estimated otherwise).

    Args:
        cfg: `DataConfig`.
        n: int. Examples in the split.
        batch_size: int.
        lengths: int array. Token lengths of a sample of the split.
        drop_remainder: bool.
        rows_per_example: float. `pack`: rows per example of the packed sample.
        batch_rows: int. `pack`: rows per batch.
    """
    from tf_effitrain.data.batching import default_boundaries

    if cfg.batching == "pack":
        return max(1, math.ceil(math.ceil(n * rows_per_example) / batch_rows))
    whole = (lambda k: k // batch_size) if drop_remainder else (
        lambda k: math.ceil(k / batch_size))
    if cfg.batching == "fixed":
        return whole(n)
    boundaries = list(cfg.bucket_boundaries or default_boundaries(cfg.max_length))
    buckets = np.bincount(np.searchsorted(boundaries, lengths, side="right"),
                          minlength=len(boundaries) + 1)
    return sum(whole(round(n * b / max(1, len(lengths)))) for b in buckets)


def prepare_stream(data_cfg, seed=42, run_dir=None, train_batch_size=None,
                   eval_batch_size=None, train_features=None, train_batch_multiple=1,
                   eval_batch_multiple=1, pack_align=1, log=None, info=None):
    """`prepare_data` for `data.stream: true` (same arguments; `info`: a `StreamInfo`
    already scanned). Returns a `DataBundle` whose `train_batches` is exact for
    `batching: fixed` and estimated for `bucket` and `pack` (see the module docstring);
    its `packing` figures come from the sample."""
    from tf_effitrain.data.batching import batch_dataset
    from tf_effitrain.data.pipeline import (
        VOCAB_FILE,
        DataBundle,
        check_split_classes,
        segments_shuffled,
        tokenize_examples,
        tokens_shuffled,
    )
    from tf_effitrain.data.tokenizer import load_or_learn_vocabulary, make_tokenizer

    log = log or (lambda line: None)
    if train_features is not None:
        raise DataError(
            "Per-example training features (e.g. precomputed teacher logits) need the "
            "corpus in memory: they cannot be combined with `data.stream: true`.")
    started = time.perf_counter()
    if info is None:
        info = scan(data_cfg, seed, log=log)
    log(f"data: {len(info):,} examples checked in {time.perf_counter() - started:.1f} s "
        f"(train {info.counts['train']:,}, validation {info.counts['validation']:,}, "
        f"test {info.counts['test']:,})")
    check_split_classes(info.class_counts, info.class_names, data_cfg)
    vocab = load_or_learn_vocabulary(
        os.path.join(run_dir, VOCAB_FILE) if run_dir else None, info.sample,
        data_cfg.vocab_size, data_cfg.lowercase, learner=data_cfg.vocab_learner,
        sample=data_cfg.vocab_sample, seed=seed, vocab_file=data_cfg.vocab_file,
        cache=data_cfg.vocab_cache, log=log)
    tokenizer = make_tokenizer(vocab, data_cfg.lowercase)
    length = data_cfg.max_length
    train_batch_size = train_batch_size or data_cfg.batch_size
    eval_batch_size = eval_batch_size or data_cfg.batch_size
    sizes = {"train": train_batch_size, "validation": eval_batch_size,
             "test": eval_batch_size}
    multiples = {"train": train_batch_multiple, "validation": eval_batch_multiple,
                 "test": eval_batch_multiple}
    sample = _tokenized_sample(info.sample[:LENGTH_SAMPLE], tokenizer, length)
    lengths = np.array([int(ids.shape[0]) for ids, _ in sample.as_numpy_iterator()])
    names = [name for name in SPLITS if info.counts[name]]
    buffer = data_cfg.shuffle_buffer

    def tokenized(name, context=None):
        ds = tokenize_examples(stream_examples(data_cfg, info, name, context), tokenizer,
                               length)
        if name == "train":
            # Files are often sorted (by class, by date): mix before batching or packing.
            ds = ds.shuffle(min(buffer, info.counts[name]), seed=seed,
                            reshuffle_each_iteration=True)
        return ds

    packing = None
    if data_cfg.batching == "pack":
        from tf_effitrain.data.packing import batch_packed, pack_examples, rows_per_batch

        slots = data_cfg.segments_per_row
        sample_rows = pack_examples(sample, length, slots, pack_align)
        num_rows = int(sample_rows.reduce(0, lambda count, _: count + 1))
        rows_per_example = num_rows / max(1, len(lengths))
        real = float(lengths.sum()) / max(1, num_rows * length)
        packing = {}
        for name in names:
            n = info.counts[name]
            batch_rows = rows_per_batch(sizes[name], n, n * rows_per_example,
                                        multiples[name])
            packing[name] = {"examples": n, "rows": math.ceil(n * rows_per_example),
                             "batch_rows": batch_rows, "real_fraction": real,
                             "estimated": True}
        train_batches = estimate_batches(data_cfg, info.counts["train"], train_batch_size,
                                         lengths, rows_per_example=rows_per_example,
                                         batch_rows=packing["train"]["batch_rows"])
    else:
        train_batches = estimate_batches(data_cfg, info.counts["train"], train_batch_size,
                                         lengths, data_cfg.drop_remainder)

    def batches(name, context=None):
        """One split's batches; with `context`, that input pipeline's share of the
        files in per-replica batches (global batch / replicas in sync)."""
        def per_replica(size):
            # Raises when `size` is not a multiple of the replicas in sync.
            return context.get_per_replica_batch_size(size) if context else size

        if packing is not None:
            rows = pack_examples(tokenized(name, context), length, slots, pack_align)
            if name == "train":
                rows = segments_shuffled(
                    rows.shuffle(buffer, seed=seed, reshuffle_each_iteration=True),
                    data_cfg.token_shuffle)
            return batch_packed(rows, per_replica(packing[name]["batch_rows"]), length,
                                slots)
        ds = tokenized(name, context)
        if name == "train":
            ds = tokens_shuffled(ds, data_cfg.token_shuffle)
        return batch_dataset(ds, data_cfg.batching, per_replica(sizes[name]), length,
                             data_cfg.bucket_boundaries,
                             data_cfg.drop_remainder and name == "train")

    class_weights = None
    if data_cfg.class_weight == "balanced":
        from tf_effitrain.data.weights import balanced_weights_of_counts, class_weighted

        class_weights = balanced_weights_of_counts(info.class_counts["train"])

    def train_fn(context=None):
        ds = batches("train", context)
        if class_weights is not None:
            ds = class_weighted(ds, class_weights)
        return ds.prefetch(tf.data.AUTOTUNE)

    pipelines = {name: batches(name) for name in names if name != "train"}
    if packing is not None and "test" in names:
        pipelines["plain_test"] = batch_dataset(
            tokenized("test"), "bucket", eval_batch_size, length,
            data_cfg.bucket_boundaries)
    pipelines = {k: v.prefetch(tf.data.AUTOTUNE) for k, v in pipelines.items()}
    pipelines["train"] = train_fn()
    majority = None
    if info.counts["test"]:
        top = int(np.argmax(info.class_counts["train"]))
        majority = info.class_counts["test"][top] / info.counts["test"]
    how = ("exact" if data_cfg.batching == "fixed"
           else f"estimated from {len(lengths):,} sampled texts")
    log(f"data: streaming, {train_batches:,} updates/epoch ({how}), ready in "
        f"{time.perf_counter() - started:.1f} s")
    return DataBundle(
        train=pipelines["train"], validation=pipelines.get("validation"),
        test=pipelines.get("test"), vocab=vocab, class_names=info.class_names,
        split_sizes=dict(info.counts), train_batches=train_batches,
        majority_baseline=majority, packing=packing,
        plain_test=pipelines.get("plain_test"), class_weights=class_weights,
        train_fn=train_fn)
