"""Class weights for imbalanced data: scikit-learn's `"balanced"` weights, applied as
per-example sample weights of the training batches.

Keras' `fit(class_weight=...)` covers one label per row only; as sample weights the same
weighting also reaches packed batches (one label per slot), gradient accumulation, the
distiller and every replica. The loss becomes Keras' weighted mean:
`sum(weight[label_i] * loss_i) / examples` (validation and test stay unweighted).
"""

import numpy as np
import tensorflow as tf

__all__ = ["balanced_class_weights", "balanced_weights_of_counts", "class_weighted"]


def balanced_class_weights(labels, num_classes):
    """scikit-learn's `"balanced"` weights: `n / (num_classes * count[c])`.

    Each class then carries the same total weight in the loss.

    Args:
        labels: int array-like. The training labels.
        num_classes: int.

    Returns:
        list of float, one per class.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"`labels` must be class indices in [0, {num_classes}). "
                         f"Received: min {labels.min()}, max {labels.max()}")
    return balanced_weights_of_counts(np.bincount(labels, minlength=num_classes))


def balanced_weights_of_counts(counts):
    """`balanced_class_weights` from the examples of each class (a streamed source
    knows its counts, not its labels)."""
    counts = np.asarray(counts, np.int64)
    num_classes = len(counts)
    missing = [i for i in range(num_classes) if counts[i] == 0]
    if missing:
        raise ValueError("Balanced class weights need an example of every class. "
                         f"Received: no example of class(es) {missing}")
    return [float(counts.sum() / (num_classes * c)) for c in counts]


def class_weighted(ds, class_weights):
    """Batches `(x, labels[, sample_weight])` -> `(x, labels, sample_weight * w[labels])`.

    Args:
        ds: `tf.data.Dataset` of batches; labels int, any shape (packed batches have one
            per slot, their weights 0 on empty slots stay 0).
        class_weights: sequence of float, one per class.

    Returns:
        The dataset with sample weights.
    """
    table = tf.constant(class_weights, tf.float32)

    def weigh(x, labels, sample_weight=None):
        weights = tf.gather(table, tf.cast(labels, tf.int32))
        if sample_weight is not None:
            weights = weights * tf.cast(sample_weight, tf.float32)
        return x, labels, weights

    return ds.map(weigh, num_parallel_calls=tf.data.AUTOTUNE)
