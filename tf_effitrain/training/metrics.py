"""Metrics an imbalanced classification task needs: per-class precision, recall and F1,
macro-F1 and the confusion matrix.

Pure NumPy functions (`confusion_matrix`, `classification_metrics`) compute the figures the run report shows; `macro_f1` is the
same macro-F1 as a streaming Keras metric (for `val_macro_f1` during `fit`, early
stopping and best-epoch selection), in either engine, for plain and packed batches.

Conventions (scikit-learn's, with `zero_division=0`): a class never predicted has
precision 0, a class absent from the labels has recall 0, and F1 is 0 when precision
and recall are both 0. Macro averages weigh every class equally, over all
`num_classes` classes (absent ones included, as `sklearn.metrics.f1_score(...,
labels=range(num_classes), average="macro")`).
"""

import numpy as np
import tensorflow as tf

__all__ = ["confusion_matrix", "classification_metrics", "macro_f1", "per_class_table",
           "plot_confusion_matrix"]


def confusion_matrix(labels, predictions, num_classes):
    """Counts of (true class, predicted class) pairs.

    Args:
        labels: int array-like of shape `[n]`. True classes.
        predictions: int array-like of shape `[n]`. Predicted classes.
        num_classes: int.

    Returns:
        int64 array `[num_classes, num_classes]`: row = true class, column = predicted.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    predictions = np.asarray(predictions, np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"`labels` and `predictions` must have the same length. Received: "
                         f"{labels.size} labels, {predictions.size} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"`{name}` must be class indices in [0, {num_classes}). "
                             f"Received: min {values.min()}, max {values.max()}")
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def _scores(confusion):
    """Per-class precision, recall, F1 (float64 arrays) of a confusion matrix."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    # zero_division=0: undefined ratios count as 0, as scikit-learn reports them.
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive),
                          where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive),
                       where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
    return precision, recall, f1


def classification_metrics(confusion, class_names=None):
    """Accuracy, macro averages and per-class figures of a confusion matrix.

    Args:
        confusion: array `[C, C]` (row = true class), e.g. from `confusion_matrix`.
        class_names: sequence of str or None. Names for the per-class rows.

    Returns:
        dict: `accuracy`, `macro_precision`, `macro_recall`, `macro_f1`, `weighted_f1`
        (F1 weighted by support), `per_class` (a list of dicts: `class`, `precision`,
        `recall`, `f1`, `support`) and `confusion` (nested lists), all JSON-ready.
    """
    confusion = np.asarray(confusion)
    num_classes = confusion.shape[0]
    names = list(class_names) if class_names is not None else [
        str(i) for i in range(num_classes)]
    precision, recall, f1 = _scores(confusion)
    support = confusion.sum(axis=1)
    total = int(support.sum())
    return {
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
        "per_class": [{"class": names[i], "precision": float(precision[i]),
                       "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int(support[i])} for i in range(num_classes)],
        "confusion": confusion.astype(np.int64).tolist(),
    }


def macro_f1(num_classes, keras=None, name="macro_f1"):
    """Macro-F1 over argmax predictions as a streaming Keras metric.

    Works for `[batch]` labels with `[batch, C]` logits or probabilities, and for packed
    batches (`[rows, slots]` labels, `[rows, slots, C]` logits): a sample weight marks
    which slots count (weight > 0 counts once, like `packed_accuracy`), so the figure is
    the same whether the examples came packed or one per row. Use it in `metrics=` (or
    `weighted_metrics=` for packed batches); its variables sum across replicas.

    Args:
        num_classes: int.
        keras: the engine's `keras` module (default: Keras 3).
        name: str.
    """
    from tf_effitrain.engine import get_keras

    keras = keras or get_keras("keras3")
    return _macro_f1_class(keras)(num_classes=num_classes, name=name)


def _macro_f1_class(keras):
    from tf_effitrain.engine import register_serializable

    cls = _CLASSES.get(keras)
    if cls is not None:
        return cls

    @register_serializable(keras)
    class MacroF1(keras.metrics.Metric):
        """Macro-averaged F1 of argmax predictions, from a streaming confusion matrix.

        Args:
            num_classes: int. Number of classes.
            name: str. The metric's name (`val_` is prefixed on validation data).
        """

        def __init__(self, num_classes, name="macro_f1", dtype="float32", **kwargs):
            super().__init__(name=name, dtype=dtype, **kwargs)
            if not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError("`num_classes` must be an integer >= 2. Received: "
                                 f"num_classes={num_classes}")
            self.num_classes = num_classes
            # float32 counts: exact up to 2**24 examples per cell, and summable by
            # every engine's cross-replica aggregation.
            self.confusion = self.add_weight(
                name="confusion", shape=(num_classes, num_classes), initializer="zeros",
                dtype="float32")

        def update_state(self, y_true, y_pred, sample_weight=None):
            y_pred = tf.convert_to_tensor(y_pred)
            labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
            predictions = tf.reshape(tf.argmax(y_pred, axis=-1, output_type=tf.int32), [-1])
            if sample_weight is None:
                weights = tf.ones_like(labels, tf.float32)
            else:
                weights = tf.reshape(tf.cast(tf.convert_to_tensor(sample_weight) > 0,
                                             tf.float32), [-1])
                weights = tf.broadcast_to(weights, tf.shape(labels))
            counts = tf.math.confusion_matrix(labels, predictions, self.num_classes,
                                              weights=weights, dtype=tf.float32)
            self.confusion.assign_add(counts)

        def result(self):
            confusion = tf.convert_to_tensor(self.confusion)
            true_positive = tf.linalg.diag_part(confusion)
            precision = tf.math.divide_no_nan(true_positive, tf.reduce_sum(confusion, 0))
            recall = tf.math.divide_no_nan(true_positive, tf.reduce_sum(confusion, 1))
            f1 = tf.math.divide_no_nan(2.0 * precision * recall, precision + recall)
            return tf.reduce_mean(f1)

        def reset_state(self):
            self.confusion.assign(tf.zeros_like(self.confusion))

        def get_config(self):
            return {**super().get_config(), "num_classes": self.num_classes}

    _CLASSES[keras] = MacroF1
    return MacroF1


_CLASSES = {}


def per_class_table(metrics):
    """Markdown lines: one row per class (precision, recall, F1, support)."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for row in metrics["per_class"]:
        lines.append(f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | "
                     f"{row['f1']:.4f} | {row['support']} |")
    return lines


def plot_confusion_matrix(confusion, class_names, path, title="confusion matrix (test)"):
    """The confusion matrix as a PNG: counts, and shading by each true class's share."""
    import matplotlib

    matplotlib.use("Agg")  # No display on servers and CI.
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    n = confusion.shape[0]
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
