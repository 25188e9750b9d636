"""Batching: length buckets (the default) or fixed padding (static shapes for TPU)."""

import tensorflow as tf

__all__ = ["default_boundaries", "batch_dataset"]


def default_boundaries(max_length):
    """Powers of two from 16 below `max_length`: buckets [0,16), [16,32), ... [.., max]."""
    boundaries, b = [], 16
    while b < max_length:
        boundaries.append(b)
        b *= 2
    return boundaries or [max_length]


def _token_ids(x):
    return x["token_ids"] if isinstance(x, dict) else x


def batch_dataset(ds, batching, batch_size, max_length, boundaries=None,
                  drop_remainder=False):
    """Batches a dataset of `(token_ids (len,), label)` pairs, padding with 0.

    The inputs may also be a dict `{"token_ids": ids, name: feature, ...}` whose other
    features have a fixed shape per example (e.g. precomputed teacher logits).

    Args:
        ds: `tf.data.Dataset` of variable-length int32 token ids and scalar labels.
        batching: str. `"bucket"`: examples of similar length are batched together and
            padded to the longest in the batch (less padding, dynamic shapes).
            `"fixed"`: every batch padded to `max_length` (static shapes).
        batch_size: int.
        max_length: int. Sequences must already be truncated to this length.
        boundaries: list of int or None. Bucket upper bounds (see `default_boundaries`).
        drop_remainder: bool. Drop short batches (a bucket's last one, or the final one).
    """
    if batching == "fixed":
        x_spec = ds.element_spec[0]
        if isinstance(x_spec, dict):
            x_shapes = {k: [max_length] if k == "token_ids" else spec.shape
                        for k, spec in x_spec.items()}
        else:
            x_shapes = [max_length]
        return ds.padded_batch(batch_size, padded_shapes=(x_shapes, []),
                               drop_remainder=drop_remainder)
    if batching != "bucket":
        raise ValueError(
            f"`batching` must be 'bucket' or 'fixed'. Received: batching={batching!r}"
        )
    boundaries = list(boundaries or default_boundaries(max_length))

    def length(x, label):
        return tf.shape(_token_ids(x))[0]

    return ds.bucket_by_sequence_length(
        element_length_func=length,
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        drop_remainder=drop_remainder,
    )
