"""`tf-effitrain bench inference`: batch-1 and batch-32 CPU latency of one model, six ways.

One randomly initialised model of the config (weights do not change latency) runs as:

- the Keras model in float32 and under `mixed_bfloat16` (same weights, copied);
- TFLite files in float32, dynamic range (int8 weights), float16 weights and full int8,
  written by the project's own export path (`export.tflite`: static SavedModel
  signature, the same converter settings and audit; int8 is calibrated on token-id rows
  taken through `representative_rows`), run by the LiteRT interpreter under the default
  resolver (XNNPack) with the thread count `tf-effitrain export` verifies with
  (`export.threads`, 1 by default).

Inputs are random token ids (no padding) at the length the export would use
(`export.sequence_length`, else `data.max_length`): the longest, slowest case.

The exported files have a static `[1, length]` signature, and the converter folds that
batch of 1 into the graph's reshapes: resizing such a file's input to 32 fails
("num_input_elements != num_output_elements"). Each batch size above 1 therefore first
tries the resize (as an app would) and, when it fails, keeps the error in the row
(`resize_error`) and measures a file converted from a SavedModel with a static
`[32, length]` signature instead (`source` says which file was timed).

Timing: every variant and batch size is prepared (traced, allocated, warmed up) first;
then `rounds` rounds visit them in turn, starting one place later each round, with
`steps` timed calls each, so machine noise lands on all of them alike. Reported: p50
and p90 per call and p50 / p90 relative to the Keras float32 model at the same batch
size (below 1 is faster). A variant that fails to convert or run records its error
string instead of a latency.
"""

import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np

from tf_effitrain.bench._measure import cpu_name, ratio, save_figure

__all__ = ["VARIANTS", "BATCH_SIZES", "QUICK_MODEL", "bench_inference", "run_suite",
           "format_result", "plot_result"]

# variant name -> TFLite quantization (None: the Keras model under that dtype policy).
VARIANTS = {
    "keras float32": ("keras", "float32"),
    "keras mixed_bfloat16": ("keras", "mixed_bfloat16"),
    "tflite float32": ("tflite", "none"),
    "tflite dynamic": ("tflite", "dynamic"),
    "tflite float16": ("tflite", "float16"),
    "tflite int8": ("tflite", "int8"),
}
REFERENCE = "keras float32"
BATCH_SIZES = (1, 32)
# `--quick`: a model small enough that converting eight files and timing them all stays
# well under 40 s on 2 shared cores (it checks the pipeline, not the demo's numbers).
QUICK_MODEL = {"num_layers": 1, "d_model": 32, "num_heads": 2, "ffn_dim": 64}
QUICK_VOCAB, QUICK_LENGTH = 300, 32


def _short(error):
    """One line of an exception, short enough for a table cell and a JSON row."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:300]


def _keras_variant(keras, model_cfg, policy, vocab_size, num_classes, length, weights,
                   seed):
    """The Keras model under `policy`, with `weights` (None: keep its own)."""
    from tf_effitrain.models import build_transformer_classifier
    from tf_effitrain.training.trainer import precision_policy

    # The policy is global state read when layers are built: set it for the build only,
    # so the caller's policy (and every later model) is untouched.
    with precision_policy(keras, policy):
        keras.utils.set_random_seed(seed)
        model = build_transformer_classifier(model_cfg, vocab_size, num_classes, length,
                                             keras=keras)
    if weights is not None:
        # Mixed policies keep float32 variables: the float32 weights load unchanged, so
        # both Keras rows compute the same function.
        model.set_weights(weights)
    return model


def _keras_call(model, batch, length):
    """A traced call with a static `[batch, length]` signature (as `keras_latencies`:
    no `predict` overhead is timed)."""
    import tensorflow as tf

    fn = tf.function(lambda ids: model(ids, training=False),
                     input_signature=[tf.TensorSpec([batch, length], tf.int32)])
    return lambda ids: np.asarray(fn(ids))


def _tflite_call(content, batch, length, threads, resize):
    """A call of the file's signature runner at `batch` rows.

    Args:
        content: bytes. The flatbuffer.
        batch: int.
        length: int.
        threads: int. Interpreter threads.
        resize: bool. Resize the file's batch-1 input to `batch` first.
    """
    from tf_effitrain.export.tflite import INPUT_NAME, OUTPUT_NAME, load_interpreter

    interpreter = load_interpreter(content, "xnnpack", threads)
    if resize:
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, [batch, length])
        # Raises here, not in the timed loop, when the file's shapes cannot follow.
        interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner("serving_default")
    output = interpreter.get_output_details()[0]
    scale, zero = output["quantization"]

    def call(ids):
        out = runner(**{INPUT_NAME: ids})[OUTPUT_NAME]
        if output["dtype"] == np.int8 and scale:  # int8 logits: dequantize (as verify)
            out = (out.astype(np.float32) - zero) * scale
        return out

    return call


def _convert(saved_model_dir, quantization, rows, batch):
    """`(flatbuffer bytes, size)` of one file converted with the project's settings.

    Batch 1 goes through `convert_tflite` (audit, then conversion: exactly what
    `tf-effitrain export` ships). A larger static batch uses the same converter settings
    (`_converter`, as `verify.debug_quantization` does) with int8 calibration steps of
    `batch` rows, since `convert_tflite` feeds one row per step and that no longer fits
    the signature; the batch-1 audit already covered the same graph.
    """
    from tf_effitrain.export.tflite import INPUT_NAME, _converter, convert_tflite

    if batch == 1:
        content, _ = convert_tflite(saved_model_dir, quantization, rows)
        return content
    converter = _converter(saved_model_dir, quantization, rows)
    if quantization == "int8":
        # Whole batches of calibration rows (repeated to fill the last one): the same
        # rows, hence the same activation ranges, as the batch-1 file's calibration.
        steps = -(-len(rows) // batch)
        tiled = np.resize(rows, (steps * batch, rows.shape[1])).astype(np.int32)
        converter.representative_dataset = lambda: (
            {INPUT_NAME: tiled[i:i + batch]} for i in range(0, len(tiled), batch))
    return converter.convert()


def _prepare_tflite(model, quantization, rows, length, batch_sizes, threads, workdir,
                    saved_models, log):
    """`{batch: entry}` for one TFLite variant; each entry holds `call` or `error`."""
    from tf_effitrain.export.tflite import export_saved_model

    def saved_model(batch):
        if batch not in saved_models:
            saved_models[batch] = export_saved_model(
                model, os.path.join(workdir, f"saved_model_b{batch}"), length, batch)
        return saved_models[batch]

    entries, batch1 = {}, None
    try:
        batch1 = _convert(saved_model(1), quantization, rows, 1)
    except Exception as e:  # ExportError and converter errors alike: keep the message
        batch1_error = _short(e)
    for b in batch_sizes:
        entry = {"source": "batch-1 file", "resize_error": None, "error": None}
        entries[b] = entry
        if batch1 is None:
            entry["error"] = batch1_error
            continue
        if b == 1:
            entry.update(size_bytes=len(batch1))
            try:
                entry["call"] = _tflite_call(batch1, 1, length, threads, resize=False)
            except Exception as e:
                entry["error"] = _short(e)
            continue
        try:
            entry["call"] = _tflite_call(batch1, b, length, threads, resize=True)
            entry.update(source="batch-1 file resized", size_bytes=len(batch1))
            continue
        except Exception as e:
            # Expected for these files: the static batch of 1 is folded into reshapes.
            entry["resize_error"] = _short(e)
        try:
            content = _convert(saved_model(b), quantization, rows, b)
            entry.update(source=f"batch-{b} file", size_bytes=len(content))
            entry["call"] = _tflite_call(content, b, length, threads, resize=False)
        except Exception as e:
            entry["error"] = _short(e)
            if log:
                log(f"  tflite {quantization} batch {b}: {entry['error']}")
    return entries


def bench_inference(model_cfg, vocab_size=4000, max_length=128, num_classes=6,
                    engine="keras3", batch_sizes=BATCH_SIZES, steps=20, rounds=5,
                    warmup=3, threads=1, num_samples=200, seed=0, variants=None,
                    log=print):
    """Measures p50 / p90 latency of the Keras and TFLite forms of one model.

    Args:
        model_cfg: `ModelConfig`.
        vocab_size: int. Vocabulary (random token ids are drawn from `[1, vocab_size)`).
        max_length: int. Length of every input row (no padding).
        num_classes: int. Width of the logits.
        engine: str. `"keras3"` or `"tf_keras"`.
        batch_sizes: sequence of int. Batch sizes, the first usually 1.
        steps: int. Timed calls per variant, batch size and round.
        rounds: int. Interleaved rounds (see the module docstring).
        warmup: int. Untimed calls of each variant first (tracing, allocation).
        threads: int. TFLite interpreter threads (`export.threads`).
        num_samples: int. int8 calibration rows.
        seed: int. Weights and token ids.
        variants: sequence of str or None. Names from `VARIANTS` (None: all); the
            ratios need `"keras float32"`.
        log: callable or None. Progress lines.

    Returns:
        dict (JSON-serializable): `rows` (one per variant and batch size: `variant`,
        `batch`, `p50_ms`, `p90_ms`, `ms_per_example`, `ratio_p50`, `ratio_p90`,
        `max_logit_diff` (vs Keras float32 on the first batch), `source`, `size_bytes`,
        `resize_error`, `error`), and the setting: `cpu`, `model`, `params`,
        `sequence_length`, `threads`, `keras_threads`, `steps`, `rounds`, ...
    """
    from tf_effitrain.engine import get_keras
    from tf_effitrain.export.tflite import representative_rows
    from tf_effitrain.models import count_params

    log = log or (lambda line: None)
    names = list(variants or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variants {unknown}. Known: {list(VARIANTS)}")
    batch_sizes = [int(b) for b in batch_sizes]
    keras = get_keras(engine)
    rng = np.random.RandomState(seed)
    # Enough distinct rows that consecutive calls do not reuse one batch.
    rows = rng.randint(1, vocab_size, size=(2 * max(batch_sizes), max_length)).astype(np.int32)
    # Calibration rows through the export's own reader of `(ids, labels)` batches.
    calibration = rng.randint(1, vocab_size, size=(num_samples, max_length)).astype(np.int32)
    calibration = representative_rows([(calibration, None)], max_length, num_samples)

    reference = _keras_variant(keras, model_cfg, "float32", vocab_size, num_classes,
                               max_length, None, seed)
    weights = reference.get_weights()
    entries = {}  # (variant, batch) -> {"call": fn} or {"error": str}, plus row fields
    workdir = tempfile.mkdtemp(prefix="tf_effitrain_bench_inference_")
    saved_models = {}
    try:
        for name in names:
            kind, setting = VARIANTS[name]
            start = time.perf_counter()
            if kind == "keras":
                try:
                    model = reference if setting == "float32" else _keras_variant(
                        keras, model_cfg, setting, vocab_size, num_classes, max_length,
                        weights, seed)
                    for b in batch_sizes:
                        entries[name, b] = {"source": "keras", "resize_error": None,
                                            "error": None, "size_bytes": None,
                                            "call": _keras_call(model, b, max_length)}
                except Exception as e:
                    for b in batch_sizes:
                        entries[name, b] = {"source": "keras", "resize_error": None,
                                            "error": _short(e), "size_bytes": None}
            else:
                prepared = _prepare_tflite(reference, setting, calibration, max_length,
                                           batch_sizes, threads, workdir, saved_models, log)
                for b, entry in prepared.items():
                    entries[name, b] = entry
            log(f"  prepared {name} ({time.perf_counter() - start:.1f} s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # Warm up (first calls trace or allocate) and keep the first batch's logits: a
    # check that every variant computes the same function as the reference.
    logits = {}
    for (name, b), entry in entries.items():
        if "call" not in entry:
            continue
        try:
            for _ in range(max(1, warmup)):
                out = entry["call"](rows[:b])
            logits[name, b] = np.asarray(out, np.float32)
        except Exception as e:  # e.g. a kernel that cannot run this shape
            entry["error"] = _short(e)
            del entry["call"]

    keys = [key for key, entry in entries.items() if "call" in entry]
    times = {key: [] for key in keys}
    for r in range(rounds):
        # Rotating the start: no variant always runs first (or right after a slow one).
        shift = r % max(1, len(keys))
        for key in keys[shift:] + keys[:shift]:
            call, b = entries[key]["call"], key[1]
            for i in range(steps):
                start_row = (i * b) % (len(rows) - b + 1)
                batch = rows[start_row:start_row + b]
                start = time.perf_counter()
                call(batch)
                times[key].append(time.perf_counter() - start)
        log(f"  round {r + 1}/{rounds} done")

    results = []
    for name in names:
        for b in batch_sizes:
            entry = entries[name, b]
            row = {"variant": name, "batch": b, "source": entry["source"],
                   "size_bytes": entry.get("size_bytes"),
                   "resize_error": entry["resize_error"], "error": entry["error"],
                   "p50_ms": None, "p90_ms": None, "ms_per_example": None,
                   "ratio_p50": None, "ratio_p90": None, "max_logit_diff": None}
            if (name, b) in times:
                ms = 1000.0 * np.asarray(times[name, b])
                row.update(p50_ms=float(np.percentile(ms, 50)),
                           p90_ms=float(np.percentile(ms, 90)))
                row["ms_per_example"] = row["p50_ms"] / b
                if (REFERENCE, b) in logits:
                    row["max_logit_diff"] = float(np.max(np.abs(
                        logits[name, b] - logits[REFERENCE, b])))
            results.append(row)
    for row in results:
        ref = next((r for r in results if r["variant"] == REFERENCE
                    and r["batch"] == row["batch"]), None)
        if row["p50_ms"] is not None and ref and ref["p50_ms"] is not None:
            row["ratio_p50"] = ratio(row["p50_ms"], ref["p50_ms"])
            row["ratio_p90"] = ratio(row["p90_ms"], ref["p90_ms"])
    import tensorflow as tf

    return {
        "suite": "inference", "cpu": cpu_name(), "engine": engine,
        "model": dataclasses.asdict(model_cfg), "params": count_params(reference)["total"],
        "vocab_size": vocab_size, "sequence_length": max_length,
        "num_classes": num_classes, "batch_sizes": batch_sizes, "variants": names,
        "reference": REFERENCE, "threads": threads, "delegates": "xnnpack",
        # 0 means TensorFlow's default: one intra-op thread per core it sees.
        "keras_threads": tf.config.threading.get_intra_op_parallelism_threads()
        or len(os.sched_getaffinity(0)),
        "steps": steps, "rounds": rounds, "calibration_rows": int(len(calibration)),
        "seed": seed, "rows": results,
    }


def run_suite(config, args, log=print):
    """The `bench inference` suite for the registry in `bench/suite.py`.

    Args:
        config: the loaded `ExperimentConfig` (its `model`, `data.max_length`,
            `data.vocab_size`, `data.classes`, `export.sequence_length`,
            `export.threads`, `export.representative_samples`, `runtime`).
        args: argparse namespace. Read: `quick` (a tiny model, few timed calls: well
            under 40 s), `steps` (timed calls per variant, batch size and round),
            `rounds`, `threads` (interpreter threads; default `export.threads`).
        log: callable or None. Progress lines.

    Returns:
        The JSON-serializable dict of `bench_inference`, plus `quick`.
    """
    quick = bool(getattr(args, "quick", False))
    model_cfg = config.model
    vocab_size = config.data.vocab_size
    export_cfg = getattr(config, "export", None)
    length = (getattr(export_cfg, "sequence_length", None) or config.data.max_length)
    if quick:
        # Sizes that depend on the full model (per-layer widths, ranks) go with it.
        model_cfg = dataclasses.replace(model_cfg, **QUICK_MODEL, embedding_rank=None,
                                        layer_heads=None, layer_ffn_dims=None, low_rank=[])
        vocab_size, length = min(vocab_size, QUICK_VOCAB), min(length, QUICK_LENGTH)
    classes = getattr(config.data, "classes", None)
    steps = getattr(args, "steps", None) or (5 if quick else 20)
    rounds = getattr(args, "rounds", None) or (2 if quick else 5)
    threads = getattr(args, "threads", None) or getattr(export_cfg, "threads", 1)
    samples = 32 if quick else getattr(export_cfg, "representative_samples", 200)
    if log:
        log(f"bench inference: {model_cfg.num_layers} layer(s), d_model {model_cfg.d_model}, "
            f"vocab {vocab_size}, sequence {length}, batch sizes {list(BATCH_SIZES)}, "
            f"{rounds} rounds x {steps} timed calls, TFLite threads {threads}"
            + (" (quick)" if quick else ""))
    result = bench_inference(
        model_cfg, vocab_size=vocab_size, max_length=length,
        num_classes=len(classes) if classes else 6, engine=config.runtime.engine,
        steps=steps, rounds=rounds, threads=threads, num_samples=samples,
        seed=config.runtime.seed, log=log)
    result["quick"] = quick
    return result


def _ms(value):
    return "-" if value is None else f"{value:.2f}"


def format_result(result):
    """A Markdown table of `run_suite`'s result (one row per variant and batch size)."""
    lines = [f"| variant | batch | p50 (ms) | p90 (ms) | ms / example | p50 vs "
             f"{result['reference']} | p90 vs {result['reference']} | file | "
             "max logit diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in result["rows"]:
        if r["error"]:
            notes.append(f"{r['variant']}, batch {r['batch']}: {r['error']}")
            lines.append(f"| {r['variant']} | {r['batch']} | failed (note "
                         f"{len(notes)}) | - | - | - | - | {r['source']} | - |")
            continue
        size = f"{r['source']}, {r['size_bytes'] / 1024:.0f} KiB" if r["size_bytes"] \
            else r["source"]
        lines.append(
            f"| {r['variant']} | {r['batch']} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} | "
            f"{_ms(r['ms_per_example'])} | "
            + (f"**{r['ratio_p50']:.2f}x**" if r["ratio_p50"] is not None else "-")
            + " | " + (f"{r['ratio_p90']:.2f}x" if r["ratio_p90"] is not None else "-")
            + f" | {size} | "
            + (f"{r['max_logit_diff']:.2g}" if r["max_logit_diff"] is not None else "-")
            + " |")
    resized = sorted({r["resize_error"] for r in result["rows"] if r["resize_error"]})
    m = result["model"]
    lines += ["", f"Model: {m['num_layers']} layer(s), d_model {m['d_model']}, "
              f"{m['num_heads']} heads, FFN {m['ffn_dim']}, vocab {result['vocab_size']} "
              f"({result['params']:,} parameters, random weights); inputs: random token "
              f"ids, {result['sequence_length']} per row (no padding). "
              f"{result['rounds']} interleaved rounds x {result['steps']} timed calls per "
              f"cell. TFLite: LiteRT interpreter, XNNPack, {result['threads']} thread(s) "
              f"(as `tf-effitrain export` verifies); Keras: TensorFlow's intra-op pool "
              f"({result['keras_threads']} threads). CPU: {result['cpu']}."
              + (" Quick run (tiny model): not the config's figures." if result.get("quick")
                 else "")]
    if resized:
        lines += ["", "Batch > 1 TFLite rows time a file exported with that static batch: "
                  "resizing the batch-1 file failed (" + "; ".join(resized[:1]) + ")."]
    if notes:
        lines += [""] + [f"Note {i}: {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def plot_result(result, path):
    """A PNG of p50 latency (p90 as the whisker) per variant, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_sizes = result["batch_sizes"]
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4.2),
                             squeeze=False)
    for ax, b in zip(axes[0], batch_sizes):
        rows = [r for r in result["rows"] if r["batch"] == b]
        names = [r["variant"] for r in rows]
        p50 = [r["p50_ms"] or 0.0 for r in rows]
        p90 = [max(0.0, (r["p90_ms"] or 0.0) - (r["p50_ms"] or 0.0)) for r in rows]
        colors = ["tab:blue" if r["source"] == "keras" else "tab:orange" for r in rows]
        bars = ax.bar(range(len(rows)), p50, yerr=[[0] * len(rows), p90], color=colors,
                      capsize=3)
        for bar, r in zip(bars, rows):
            label = "failed" if r["error"] else (
                f"{r['ratio_p50']:.2f}x" if r["ratio_p50"] is not None else "")
            top = r["p90_ms"] or bar.get_height()  # above the whisker, not on it
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("p50 latency per call (ms), whisker to p90")
        ax.set_title(f"batch {b}, {result['sequence_length']} tokens per row")
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, f"Inference latency, {result['cpu']} (ratio: vs "
                             f"{result['reference']})")
