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


def batch_dataset(ds, batching, batch_size, max_length, boundaries=None,
                  drop_remainder=False):
    """Batches a dataset of `(token_ids (len,), label)` pairs, padding with 0.

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
        return ds.padded_batch(batch_size, padded_shapes=([max_length], []),
                               drop_remainder=drop_remainder)
    if batching != "bucket":
        raise ValueError(
            f"`batching` must be 'bucket' or 'fixed'. Received: batching={batching!r}"
        )
    boundaries = list(boundaries or default_boundaries(max_length))

    def length(ids, label):
        return tf.shape(ids)[0]

    return ds.bucket_by_sequence_length(
        element_length_func=length,
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        drop_remainder=drop_remainder,
    )
