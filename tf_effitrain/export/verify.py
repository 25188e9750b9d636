"""Verification by running the file: accuracy, agreement, logit error, size, latency.

Every number is read from a real interpreter run on the run's test split, one example
at a time (batch 1, as on a device), under the default resolver with XNNPack and
without delegates (int8 kernels differ between them), beside the Keras model's own
figures measured in the same process.
"""

import os
import time

import numpy as np
import tensorflow as tf

from tf_effitrain.export.tflite import (
    INPUT_NAME,
    OUTPUT_NAME,
    gzipped_size,
    load_interpreter,
)

__all__ = ["run_tflite", "verify_tflite", "keras_reference", "debug_quantization"]


def _percentiles(times):
    ms = 1000.0 * np.asarray(times)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 90))


def run_tflite(path, rows, delegates="xnnpack", threads=1, warmup=3):
    """Logits of every row (batch 1) and the per-call latencies in seconds."""
    interpreter = load_interpreter(path, delegates, threads)
    runner = interpreter.get_signature_runner("serving_default")
    output = interpreter.get_output_details()[0]
    scale, zero = output["quantization"]
    for row in rows[:warmup]:
        runner(**{INPUT_NAME: row[None]})
    logits, times = [], []
    for row in rows:
        start = time.perf_counter()
        out = runner(**{INPUT_NAME: row[None]})[OUTPUT_NAME]
        times.append(time.perf_counter() - start)
        out = out.astype(np.float32)
        if output["dtype"] == np.int8 and scale:  # int8 output: dequantize
            out = (out - zero) * scale
        logits.append(out[0])
    return np.stack(logits), times


def keras_reference(model, rows, warmup=3, timed=None):
    """The Keras model's logits on `rows` and its batch-1 latencies (a traced
    `tf.function` with the same static signature as the file: no Python overhead of
    `model.predict` is counted against it)."""
    logits = np.concatenate([np.asarray(model(rows[i:i + 64], training=False))
                             for i in range(0, len(rows), 64)])
    serve = tf.function(lambda ids: model(ids, training=False), jit_compile=False,
                        input_signature=[tf.TensorSpec([1, rows.shape[1]], tf.int32)])
    timed = rows[:timed] if timed else rows
    for row in timed[:warmup]:
        serve(row[None])
    times = []
    for row in timed:
        start = time.perf_counter()
        np.asarray(serve(row[None]))
        times.append(time.perf_counter() - start)
    return logits.astype(np.float32), times


def verify_tflite(path, rows, labels, reference_logits, delegates=("xnnpack", "none"),
                  threads=1):
    """One report row per delegate setting for the `.tflite` file at `path`.

    Args:
        path: str. The file.
        rows: int32 array (n, sequence_length). Padded token ids of the test split.
        labels: int array (n,). Their classes.
        reference_logits: float array (n, classes). The Keras model's logits.
        delegates: sequence of `"xnnpack"` / `"none"`.
        threads: int.

    Returns:
        list of dict: `delegates`, `accuracy`, `agreement` (same argmax as Keras),
        `max_logit_diff`, `size_bytes`, `gzip_bytes`, `latency_p50_ms`,
        `latency_p90_ms`, `threads`, `examples`.
    """
    labels = np.asarray(labels)
    results = []
    for setting in delegates:
        logits, times = run_tflite(path, rows, setting, threads)
        p50, p90 = _percentiles(times)
        results.append({
            "delegates": setting,
            "accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "agreement": float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1))),
            "max_logit_diff": float(np.max(np.abs(logits - reference_logits))),
            "size_bytes": os.path.getsize(path),
            "gzip_bytes": gzipped_size(path),
            "latency_p50_ms": p50,
            "latency_p90_ms": p90,
            "threads": threads,
            "examples": int(len(rows)),
        })
    return results


def debug_quantization(saved_model_dir, representative, debug_rows, top=15):
    """Per-layer float-vs-int8 error (TFLite's QuantizationDebugger), worst first.

    Args:
        saved_model_dir: str. The float SavedModel the int8 file is converted from.
        representative: int32 rows for calibration.
        debug_rows: int32 rows the errors are measured on.
        top: int. Rows kept.

    Returns:
        list of dict: `op_name`, `tensor_name`, `num_elements`, `scale`,
        `mean_squared_error`, `max_abs_error`, `rmse_over_scale` (error in quantization
        steps: above ~0.3 the layer loses more than rounding).
    """
    import csv
    import io

    from tf_effitrain.export.tflite import _converter

    converter = _converter(saved_model_dir, "int8", representative)

    def dataset():
        for row in debug_rows:  # the debugger takes positional inputs
            yield [row[None]]

    import warnings

    with warnings.catch_warnings():  # it runs TensorFlow's (deprecated) interpreter
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter,
                                                             debug_dataset=dataset)
        debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    rows = []
    for record in csv.DictReader(buffer):
        scale = float(record.get("scale") or 0.0)
        mse = float(record.get("mean_squared_error") or 0.0)
        rows.append({
            "op_name": record.get("op_name"),
            "tensor_name": record.get("tensor_name"),
            "num_elements": int(float(record.get("num_elements") or 0)),
            "scale": scale,
            "mean_squared_error": mse,
            "max_abs_error": float(record.get("max_abs_error") or 0.0),
            "rmse_over_scale": float(np.sqrt(mse) / scale) if scale else 0.0,
        })
    rows.sort(key=lambda r: r["rmse_over_scale"], reverse=True)
    return rows[:top]
