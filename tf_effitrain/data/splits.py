"""Deterministic, stratified train / validation / test splits."""

import numpy as np

__all__ = ["split_indices"]


def split_indices(labels, val_fraction, test_fraction, seed):
    """Splits example indices per class, so every split keeps the class proportions.

    Args:
        labels: sequence of int class indices.
        val_fraction: float. Share of each class for validation.
        test_fraction: float. Share of each class for the test split.
        seed: int. The same seed always gives the same split.

    Returns:
        dict `{"train", "validation", "test"}` of sorted int index arrays that
        partition `range(len(labels))`.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    parts = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        n_val = int(round(val_fraction * len(idx)))
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
