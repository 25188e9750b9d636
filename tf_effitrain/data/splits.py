"""Deterministic train / validation / test splits: stratified (in memory) or by a hash
of each example's text (one example at a time)."""

import hashlib

import numpy as np

__all__ = ["split_indices", "hash_split"]


def hash_split(text, val_fraction, test_fraction):
    """The split of one example, from a hash of its UTF-8 text.

    The same text lands in the same split on every run and machine (BLAKE2b, not
    Python's salted `hash`), so duplicated texts never straddle train and test, and no
    other example needs to be seen. Each split gets its fraction of the distinct
    texts, up to sampling noise (about `sqrt(f (1 - f) / n)`).

    Args:
        text: str.
        val_fraction: float.
        test_fraction: float.

    Returns:
        `"train"`, `"validation"` or `"test"`.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


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
