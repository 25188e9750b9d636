"""Export a finished run: files, verification on its test split, and the report.

`export_run(run_dir)` (behind `tf-effitrain export RUN_DIR` and the `export:` config
section of `train`) loads the run's model, rebuilds its splits (same seed, cached
vocabulary), exports each requested format and quantization into `RUN_DIR/export/`
with `tokenizer.json` and `vocab.txt` beside the files, runs every `.tflite` file on
the test split under both delegate settings, and writes `export_report.md` and
`export_report.json` into the run directory.
"""

import json
import os
import platform

import numpy as np

from tf_effitrain.config import load_config
from tf_effitrain.errors import DataError, RunDirError

__all__ = ["export_run", "EXPORT_REPORT"]

EXPORT_REPORT = "export_report"


def _rows_and_labels(dataset, sequence_length):
    """Every example of a batched `(token_ids, labels)` split as fixed-length rows."""
    if isinstance(dataset.element_spec[0], dict):
        raise DataError(
            "These batches are packed rows (`data.batching: pack`); the saved model and "
            "its files take one text per row. Prepare the data with "
            "`tf_effitrain.data.unpacked(config.data)`.")
    rows, labels = [], []
    for ids, y in dataset:
        for row, label in zip(np.asarray(ids), np.asarray(y)):
            padded = np.zeros(sequence_length, np.int32)
            row = row[:sequence_length]
            padded[:len(row)] = row
            rows.append(padded)
            labels.append(int(label))
    return np.stack(rows), np.asarray(labels)


def _float32_model(model, config, vocab_size, num_classes, keras):
    """`model` computing in float32: TFLite has no bfloat16 kernels, and a mixed
    precision model would export its casts. Builder models are rebuilt in float32 with
    the same weights (the variables were float32 all along)."""
    policies = {getattr(getattr(layer, "dtype_policy", None), "name", "float32")
                for layer in model.layers}
    if policies <= {"float32"}:
        return model, None
    from tf_effitrain.models import build_transformer_classifier
    from tf_effitrain.training.trainer import precision_policy

    with precision_policy(keras, "float32"):
        rebuilt = build_transformer_classifier(config.model, vocab_size, num_classes,
                                               config.data.max_length, keras=keras)
    rebuilt.set_weights(model.get_weights())
    return rebuilt, f"rebuilt in float32 from its {sorted(policies - {'float32'})} layers"


def _saved_model_check(path, rows, labels, reference):
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    logits = np.concatenate([serve(token_ids=tf.constant(row[None]))["logits"].numpy()
                             for row in rows])
    return {"format": "saved_model", "file": os.path.basename(path), "quantization": "none",
            "delegates": "-", "accuracy": float(np.mean(logits.argmax(-1) == labels)),
            "agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
            "max_logit_diff": float(np.max(np.abs(logits - reference)))}


def export_run(run_dir, formats=("tflite",), quantizations=("none", "float16", "dynamic",
                                                            "int8"),
               sequence_length=None, num_samples=200, allow_flex=False, threads=1,
               delegates=("xnnpack", "none"), debug_quantization=False, out_dir=None,
               int8_output=False, log=print):
    """Exports and verifies a finished run's model; returns the report as a dict.

    Args:
        run_dir: str. A directory written by `tf-effitrain train`.
        formats: sequence of `"tflite"` / `"saved_model"`.
        quantizations: sequence of `"none"`, `"float16"`, `"dynamic"`, `"int8"` (TFLite).
        sequence_length: int or None. The files' fixed input length; None: the run's
            `data.max_length`.
        num_samples: int. Representative training examples for int8 calibration.
        allow_flex: bool. Accept ops that need the Flex delegate.
        threads: int. Interpreter threads for the latency figures.
        delegates: sequence of `"xnnpack"` / `"none"`: the settings verified.
        debug_quantization: bool. Add the per-layer float-vs-int8 error table.
        out_dir: str or None. Where the files go; None: `RUN_DIR/export`.
        int8_output: bool. The int8 file returns int8 logits (with the output's scale
            and zero point) instead of float32; verification dequantizes them.
        log: callable or None. Progress lines.

    Returns:
        dict with `keras` (accuracy, batch-1 latency), `rows` (one per file and
        delegate setting), `audits`, `files`, and `debug_quantization` when asked.
    """
    from tf_effitrain.bench._measure import cpu_name
    from tf_effitrain.data.pipeline import prepare_data, unpacked
    from tf_effitrain.engine import get_keras
    from tf_effitrain.export.predict import write_tokenizer_settings
    from tf_effitrain.export.tflite import (
        QUANTIZATIONS,
        ExportError,
        export_saved_model,
        export_tflite,
        representative_rows,
    )
    from tf_effitrain.export.verify import debug_quantization as debug
    from tf_effitrain.export.verify import keras_reference, verify_tflite
    from tf_effitrain.training.trainer import CONFIG_FILE, MODEL_FILE, precision_policy

    log = log or (lambda message: None)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise RunDirError(f"{os.path.join(run_dir, name)!r} not found: is {run_dir!r} a "
                              "finished `tf-effitrain train` run?")
    for q in quantizations:
        if q not in QUANTIZATIONS:
            raise ExportError(f"`quantize` must be among {QUANTIZATIONS}. Received: {q!r}")
    for fmt in formats:
        if fmt not in ("tflite", "saved_model"):
            raise ExportError("`format` must be 'tflite' or 'saved_model'. "
                              f"Received: {fmt!r}")
    config = load_config(os.path.join(run_dir, CONFIG_FILE))
    length = sequence_length or config.data.max_length
    if length > config.data.max_length:
        raise ExportError(
            f"`sequence_length` {length} is longer than the model's `data.max_length` "
            f"({config.data.max_length}): its position table has no rows past that. Use "
            f"at most {config.data.max_length}.")
    out_dir = out_dir or os.path.join(run_dir, "export")
    os.makedirs(out_dir, exist_ok=True)
    # The saved model takes one example per row: packed runs are verified unpacked.
    data = prepare_data(unpacked(config.data), config.runtime.seed, run_dir)
    split, split_name = (data.test, "test") if data.test is not None else (
        data.validation, "validation")
    if split is None:
        raise DataError(f"The run {run_dir!r} has no test or validation split to verify "
                        "the exported files on.")
    rows, labels = _rows_and_labels(split, length)
    keras = get_keras(config.runtime.engine)
    with precision_policy(keras, "float32"):
        model = keras.models.load_model(os.path.join(run_dir, MODEL_FILE), compile=False)
        model, rebuilt = _float32_model(model, config, len(data.vocab),
                                        len(data.class_names), keras)
        reference, keras_times = keras_reference(model, rows)
    keras_row = {
        "accuracy": float(np.mean(reference.argmax(-1) == labels)),
        "latency_p50_ms": float(np.percentile(1000 * np.asarray(keras_times), 50)),
        "latency_p90_ms": float(np.percentile(1000 * np.asarray(keras_times), 90)),
    }
    log(f"export: {split_name} split of {len(rows)} examples, sequence length {length}; "
        f"Keras float32 accuracy {keras_row['accuracy']:.4f}, batch-1 p50 "
        f"{keras_row['latency_p50_ms']:.2f} ms")
    write_tokenizer_settings(out_dir, data.vocab, config.data, data.class_names, length)
    report = {"run_dir": os.path.abspath(run_dir), "split": split_name,
              "examples": int(len(rows)), "sequence_length": int(length),
              "engine": config.runtime.engine, "cpu": cpu_name(),
              "python": platform.python_version(), "float32_rebuild": rebuilt,
              "keras": keras_row, "rows": [], "audits": {}, "files": []}
    representative = None
    if "tflite" in formats and "int8" in quantizations:
        representative = representative_rows(data.train, length, num_samples)
    if "saved_model" in formats:
        path = os.path.join(out_dir, "saved_model")
        export_saved_model(model, path, length)
        report["rows"].append(_saved_model_check(path, rows, labels, reference))
        report["files"].append(path)
        log(f"export: {path}")
    if "tflite" in formats:
        for q in quantizations:
            path = os.path.join(out_dir, f"model_{'float32' if q == 'none' else q}.tflite")
            audit = export_tflite(model, path, q, representative, length, allow_flex,
                                  int8_output=int8_output)
            report["audits"][os.path.basename(path)] = audit.to_dict()
            report["files"].append(path)
            for row in verify_tflite(path, rows, labels, reference, delegates, threads):
                report["rows"].append({"format": "tflite", "file": os.path.basename(path),
                                       "quantization": q, **row})
                log(f"export: {os.path.basename(path)} [{row['delegates']}] accuracy "
                    f"{row['accuracy']:.4f}, agreement {row['agreement']:.4f}, "
                    f"{row['size_bytes'] / 1024:.0f} KB ({row['gzip_bytes'] / 1024:.0f} KB "
                    f"gzipped), p50 {row['latency_p50_ms']:.2f} ms")
    if debug_quantization:
        import shutil
        import tempfile

        workdir = tempfile.mkdtemp(prefix="tf_effitrain_debug_")
        try:
            saved = export_saved_model(model, os.path.join(workdir, "sm"), length)
            calibration = representative if representative is not None else (
                representative_rows(data.train, length, num_samples))
            report["debug_quantization"] = debug(saved, calibration, rows[:64])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    _write_report(run_dir, report)
    return report


def _fmt_size(n):
    return f"{n / 1024:.0f} KB" if n < 2**20 else f"{n / 2**20:.2f} MB"


def _write_report(run_dir, report):
    with open(os.path.join(run_dir, EXPORT_REPORT + ".json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    keras_row = report["keras"]
    lines = [
        f"# Export report: {os.path.basename(report['run_dir'])}",
        "",
        f"Verified on the {report['split']} split ({report['examples']} examples), batch 1, "
        f"sequence length {report['sequence_length']}, on {report['cpu']}. Keras float32 "
        f"model ({report['engine']}): accuracy **{keras_row['accuracy']:.4f}**, batch-1 "
        f"latency p50 {keras_row['latency_p50_ms']:.2f} ms / p90 "
        f"{keras_row['latency_p90_ms']:.2f} ms (a traced `tf.function`, same process).",
    ]
    if report.get("float32_rebuild"):
        lines += ["", f"The model was {report['float32_rebuild']}."]
    lines += [
        "",
        "| file | quantization | delegates | accuracy | agreement | max logit diff | size | "
        "gzipped | p50 ms | p90 ms | p50 vs Keras |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["format"] == "saved_model":
            lines.append(f"| {r['file']}/ | none | - | {r['accuracy']:.4f} | "
                         f"{r['agreement']:.4f} | {r['max_logit_diff']:.2g} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['file']} | {r['quantization']} | {r['delegates']} | {r['accuracy']:.4f} | "
            f"{r['agreement']:.4f} | {r['max_logit_diff']:.2g} | {_fmt_size(r['size_bytes'])} | "
            f"{_fmt_size(r['gzip_bytes'])} | {r['latency_p50_ms']:.2f} | "
            f"{r['latency_p90_ms']:.2f} | "
            f"{r['latency_p50_ms'] / keras_row['latency_p50_ms']:.2f}x |")
    lines += ["", "`agreement`: share of examples with the Keras model's predicted class. "
              "`delegates`: `xnnpack` is the default resolver an app gets; `none` runs the "
              "builtin kernels only (int8 results can differ between them).", "",
              "## Ops", ""]
    for name, audit in report["audits"].items():
        ops = ", ".join(f"{op} {n}" for op, n in audit["ops"].items())
        lines.append(f"- `{name}`: {ops}")
        if audit["float_ops"]:
            lines.append(f"  - computed in float in the int8 file: {', '.join(audit['float_ops'])}")
        if audit["flex_ops"]:
            lines.append(f"  - need the Flex delegate: {', '.join(audit['flex_ops'])}")
    if report.get("debug_quantization"):
        lines += ["", "## Per-layer int8 error (TFLite quantization debugger)", "",
                  "Worst first; `rmse / scale` is the error in quantization steps (about "
                  "0.29 is pure rounding; much more means the layer loses accuracy).", "",
                  "| op | tensor | elements | scale | rmse / scale | max abs error |",
                  "|---|---|---|---|---|---|"]
        for r in report["debug_quantization"]:
            lines.append(f"| {r['op_name']} | `{r['tensor_name'][:60]}` | {r['num_elements']} | "
                         f"{r['scale']:.3g} | {r['rmse_over_scale']:.2f} | "
                         f"{r['max_abs_error']:.3g} |")
    with open(os.path.join(run_dir, EXPORT_REPORT + ".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
