"""Token-shuffle augmentation ("confusion training") for classification.

A training example's tokens are randomly permuted with probability `prob`. The label is
kept: the model must not lean only on word order, which regularises small-data training.
"""

import tensorflow as tf

__all__ = ["token_shuffle"]


def token_shuffle(token_ids, prob, seed=None):
    """Shuffles the 1-D `token_ids` with probability `prob`; for use in `tf.data.map`."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"`prob` must be in [0, 1]. Received: prob={prob}")
    if prob == 0.0:
        return token_ids
    return tf.cond(
        tf.random.uniform([], seed=seed) < prob,
        lambda: tf.random.shuffle(token_ids, seed=seed),
        lambda: token_ids,
    )
