"""Sequence packing: several short examples per row of `max_length`, no padding computed.

A packed batch is `({"token_ids", "segment_ids"}, labels, sample_weight)`:
- `token_ids` (rows, max_length): the examples' tokens side by side, 0 after the last;
- `segment_ids` (rows, max_length): 1..k for the row's k examples, 0 for padding; the
  model's packed twin (`build_transformer_classifier(..., max_segments=S)`) attends
  within a segment only, restarts positions per segment and pools each segment;
- `labels` (rows, S): the label of segment j + 1 in slot j (0 in empty slots);
- `sample_weight` (rows, S): 0 in empty slots; the real slots share `rows * S` equally,
  so Keras' default loss reduction (the sum over slots divided by their number) is the
  mean loss over the batch's *examples*. Because the weights are fixed per batch before
  the batch is split, this holds exactly for accumulated micro-batches and for replicas.

Rows are filled first-fit-decreasing within windows of examples, in TensorFlow ops (no
Python in the pipeline: TPU and tf.data service friendly); every batch has the same
static shape (the last one is completed with empty rows of weight 0).
"""

import tensorflow as tf

__all__ = ["pack_window", "pack_examples", "batch_packed", "shuffle_segments",
           "pack_dataset", "rows_per_batch", "packed_accuracy"]


def _first_fit(sizes, capacity, max_segments):
    """Row, offset and segment id (1-based) of each item, first-fit in the given order.

    Args:
        sizes: int32 (n,) slots each item occupies (its aligned length).
        capacity: int. Slots per row.
        max_segments: int. Items per row at most.

    Returns:
        `(row, offset, segment)`, three int32 (n,) tensors. The rows used are a prefix
        `0..max(row)`.
    """
    n = tf.shape(sizes)[0]
    remaining = tf.fill([n], capacity)  # n rows are always enough
    used = tf.zeros([n], tf.int32)

    def body(i, remaining, used, row, offset, segment):
        size = sizes[i]
        fits = tf.logical_and(remaining >= size, used < max_segments)
        r = tf.cast(tf.argmax(tf.cast(fits, tf.int32)), tf.int32)  # the first that fits
        at = [[r]]
        row = tf.tensor_scatter_nd_update(row, [[i]], [r])
        offset = tf.tensor_scatter_nd_update(offset, [[i]], [capacity - remaining[r]])
        segment = tf.tensor_scatter_nd_update(segment, [[i]], [used[r] + 1])
        remaining = tf.tensor_scatter_nd_sub(remaining, at, [size])
        used = tf.tensor_scatter_nd_add(used, at, [1])
        return i + 1, remaining, used, row, offset, segment

    zeros = tf.zeros([n], tf.int32)
    _, _, _, row, offset, segment = tf.while_loop(
        lambda i, *_: i < n, body, (0, remaining, used, zeros, zeros, zeros))
    return row, offset, segment


def pack_window(token_ids, labels, max_segments, align=1):
    """Packs one window of examples into rows.

    Args:
        token_ids: int32 (n, max_length), each example's tokens then 0s (a padded
            batch); an example must hold at least one non-zero token.
        labels: int32 (n,).
        max_segments: int. Most examples per row.
        align: int. Each example starts at a multiple of `align` (block-sparse
            attention needs its blocks to start where the example does).

    Returns:
        `(token_ids, segment_ids, labels, slot_mask)` of shapes (rows, max_length),
        (rows, max_length), (rows, max_segments), (rows, max_segments); `rows <= n`.
    """
    token_ids = tf.convert_to_tensor(token_ids, tf.int32)
    n, length = tf.shape(token_ids)[0], token_ids.shape[1] or tf.shape(token_ids)[1]
    lengths = tf.reduce_sum(tf.cast(token_ids != 0, tf.int32), axis=1)
    sizes = tf.minimum((lengths + align - 1) // align * align, length)
    # Longest first: the short ones then fill the gaps (first-fit decreasing).
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)
    row_s, offset_s, segment_s = _first_fit(tf.gather(sizes, order), length, max_segments)
    inverse = tf.math.invert_permutation(order)
    row, offset, segment = (tf.gather(t, inverse) for t in (row_s, offset_s, segment_s))
    rows = tf.reduce_max(row) + 1

    positions = tf.range(length)[None, :]
    real = positions < lengths[:, None]  # (n, length)
    flat = (row * length + offset)[:, None] + positions  # where each token goes
    where = tf.boolean_mask(flat, real)[:, None]
    packed_ids = tf.scatter_nd(where, tf.boolean_mask(token_ids, real), [rows * length])
    packed_segments = tf.scatter_nd(
        where, tf.boolean_mask(tf.broadcast_to(segment[:, None], [n, length]), real),
        [rows * length])
    slots = tf.stack([row, segment - 1], axis=1)
    packed_labels = tf.scatter_nd(slots, tf.cast(labels, tf.int32), [rows, max_segments])
    slot_mask = tf.scatter_nd(slots, tf.ones([n], tf.float32), [rows, max_segments])
    return (tf.reshape(packed_ids, [rows, length]),
            tf.reshape(packed_segments, [rows, length]), packed_labels, slot_mask)


def pack_examples(ds, max_length, max_segments, align=1, window=1024):
    """Packs a dataset of `(token_ids (len,), label)` examples into rows.

    Args:
        ds: `tf.data.Dataset` of int32 token ids (truncated to `max_length`, at least
            one non-zero id) and int32 scalar labels.
        max_length: int. Row length.
        max_segments: int. Most examples per row (the packed model's slot count).
        align: int. See `pack_window`.
        window: int. Examples packed together (more: fuller rows, more memory).

    Returns:
        Dataset of rows `(token_ids (max_length,), segment_ids (max_length,),
        labels (max_segments,), slot_mask (max_segments,))`.
    """
    for arg, value in (("max_length", max_length), ("max_segments", max_segments),
                       ("align", align), ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{arg}` must be an integer >= 1. Received: {arg}={value!r}")

    def pack(ids, labels):
        return pack_window(ids, labels, max_segments, align)

    # Windows are packed in parallel (in order): a streamed corpus packs every epoch.
    return (ds.padded_batch(window, padded_shapes=([max_length], []))
            .map(pack, num_parallel_calls=tf.data.AUTOTUNE).unbatch())


def shuffle_segments(token_ids, segment_ids, prob, seed=None):
    """Token-shuffle augmentation of one packed row: each segment's tokens are permuted
    (among themselves, in their own positions) with probability `prob`; padding and
    the other segments stay where they are.

    The packed twin of `augment.token_shuffle`, for `tf.data.map` over rows.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"`prob` must be in [0, 1]. Received: prob={prob}")
    if prob == 0.0:
        return token_ids
    length = tf.shape(token_ids)[0]
    slots = tf.reduce_max(segment_ids) + 1
    chosen = tf.random.uniform([slots], seed=seed) < prob  # per segment id
    picked = tf.logical_and(tf.gather(chosen, segment_ids), segment_ids > 0)
    position = tf.range(length)
    # A segment is contiguous: [start, start + size). A picked token gets a random sort
    # key inside that range, every other position its own position as key, so the sort
    # permutes each picked segment within its own positions (aligned gaps stay put).
    start = tf.gather(tf.math.unsorted_segment_min(position, segment_ids, slots),
                      segment_ids)
    size = tf.gather(tf.math.unsorted_segment_sum(tf.ones_like(position), segment_ids,
                                                  slots), segment_ids)
    key = tf.where(picked,
                   tf.cast(start, tf.float32) + tf.random.uniform([length], seed=seed)
                   * tf.cast(size, tf.float32) * (1.0 - 1e-6),
                   tf.cast(position, tf.float32))
    return tf.gather(token_ids, tf.argsort(key, stable=True))


def batch_packed(rows, batch_rows, max_length, max_segments):
    """Batches packed rows into `({"token_ids", "segment_ids"}, labels, sample_weight)`
    of static shape; the last batch is completed with empty rows (weight 0).

    Args:
        rows: dataset of `pack_examples`' rows.
        batch_rows: int. Rows per batch.
        max_length: int.
        max_segments: int.
    """
    if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
        raise ValueError(
            f"`batch_rows` must be an integer >= 1. Received: batch_rows={batch_rows!r}")
    slots = float(batch_rows * max_segments)

    def to_batch(ids, segments, labels, mask):
        missing = batch_rows - tf.shape(ids)[0]
        ids, segments, labels, mask = (
            tf.pad(t, [[0, missing], [0, 0]]) for t in (ids, segments, labels, mask))
        # Real slots share the batch's `rows * slots` weight: Keras' mean over slots is
        # then the mean over the batch's examples (also per micro-batch and replica).
        weight = mask * (slots / tf.maximum(tf.reduce_sum(mask), 1.0))
        shape = lambda t, width: tf.ensure_shape(t, [batch_rows, width])  # noqa: E731
        return ({"token_ids": shape(ids, max_length),
                 "segment_ids": shape(segments, max_length)},
                shape(labels, max_segments), shape(weight, max_segments))

    return rows.batch(batch_rows).map(to_batch, num_parallel_calls=tf.data.AUTOTUNE)


def rows_per_batch(batch_size, examples, rows, multiple=1):
    """Rows per packed batch holding about `batch_size` examples when `examples`
    examples were packed into `rows` rows, rounded to a multiple of `multiple`
    (replicas x accumulation steps) and at least `multiple`."""
    parts = max(1, round(batch_size * rows / max(examples, 1) / multiple))
    return parts * multiple


def pack_dataset(ds, max_length, max_segments, batch_rows, align=1, window=1024):
    """Packs a dataset of `(token_ids (len,), label)` examples into batches of rows.

    Args:
        ds: `tf.data.Dataset` of int32 token ids (truncated to `max_length`, at least
            one non-zero id) and int32 scalar labels, in the order to pack (shuffle
            before).
        max_length: int. Row length.
        max_segments: int. Most examples per row (the packed model's slot count).
        batch_rows: int. Rows per batch; the last batch is completed with empty rows.
        align: int. See `pack_window`.
        window: int. Examples packed together (more: fuller rows, more memory).

    Returns:
        Dataset of `({"token_ids", "segment_ids"}, labels, sample_weight)` batches of
        static shape (see the module docstring).

    Example:

    ```python
    from tf_effitrain.data import pack_dataset, packed_accuracy

    model, packed = et.build_transformer_classifier(cfg, 4000, 6, 128, max_segments=16)
    packed.compile("adamw", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   weighted_metrics=[packed_accuracy()])
    packed.fit(pack_dataset(examples.shuffle(10_000), 128, 16, batch_rows=10))
    model.save("model.keras")  # one example per row, same weights
    ```
    """
    rows = pack_examples(ds, max_length, max_segments, align, window)
    return batch_packed(rows, batch_rows, max_length, max_segments)


def packed_accuracy(keras=None, name="accuracy"):
    """Accuracy over the real slots of packed batches (a `weighted_metrics` entry).

    The packed sample weights are 0 for empty slots and equal per batch otherwise; this
    metric counts every real example once, whatever its batch's weight.
    """
    from tf_effitrain.engine import get_keras

    keras = keras or get_keras("keras3")
    return _packed_accuracy_class(keras)(name=name)


def _packed_accuracy_class(keras):
    from tf_effitrain.engine import register_serializable

    cls = _CLASSES.get(keras)
    if cls is None:
        @register_serializable(keras)
        class PackedAccuracy(keras.metrics.SparseCategoricalAccuracy):
            """Sparse categorical accuracy counting each slot of weight > 0 once."""

            def update_state(self, y_true, y_pred, sample_weight=None):
                if sample_weight is not None:
                    sample_weight = tf.cast(tf.convert_to_tensor(sample_weight) > 0,
                                            self.dtype)
                return super().update_state(y_true, y_pred, sample_weight)

        cls = _CLASSES[keras] = PackedAccuracy
    return cls


_CLASSES = {}
