"""Batch-1 and batch-N CPU latency of Keras models, measured side by side."""

import time

import numpy as np

__all__ = ["keras_latencies"]


def keras_latencies(models, rows, batch_sizes=(1, 32), timed=30, rounds=3, warmup=3):
    """Median latency of each model at each batch size, in milliseconds.

    Each model runs through a traced function with a static `[batch, length]` int32
    signature (no `predict` overhead). `rounds` rounds visit the models in turn, so
    machine noise hits them alike.

    Args:
        models: dict of name -> Keras model (either engine).
        rows: int32 array `[n, length]` of padded token ids (`n >= max(batch_sizes)`).
        batch_sizes: sequence of int.
        timed: int. Timed calls per model, batch size and round.
        rounds: int.
        warmup: int. Untimed calls first (tracing).

    Returns:
        `{name: {batch_size: ms}}`.
    """
    import tensorflow as tf

    rows = np.asarray(rows, np.int32)
    fns = {}
    for name, model in models.items():
        for b in batch_sizes:
            if b > len(rows):
                raise ValueError(f"Batch size {b} needs at least {b} rows; got {len(rows)}.")
            fn = tf.function(lambda ids, model=model: model(ids, training=False),
                             input_signature=[tf.TensorSpec([b, rows.shape[1]], tf.int32)])
            for _ in range(warmup):
                np.asarray(fn(rows[:b]))
            fns[name, b] = fn
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for (name, b), fn in fns.items():
            for i in range(timed):
                start_row = (i * b) % max(1, len(rows) - b + 1)
                batch = rows[start_row:start_row + b]
                start = time.perf_counter()
                np.asarray(fn(batch))
                times[name, b].append(time.perf_counter() - start)
    return {name: {b: 1000 * float(np.median(times[name, b])) for b in batch_sizes}
            for name in models}
