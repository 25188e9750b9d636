"""TFLite conversion: static signature, representative data, audit, convert.

`export_tflite` is the one entry point for a Keras model of either engine:

1. the model is written as a SavedModel with one static signature
   `serving_default(token_ids: int32[batch, sequence_length]) -> {"logits"}` (Keras 3
   through its `ExportArchive`, tf_keras through `tf.saved_model.save`; never
   `from_keras_model`, which fails on Keras 3 models);
2. an audit conversion (TFLite builtins plus Flex allowed) lists the ops that would
   need Flex, and fails unless `allow_flex`; dynamic dimensions are found on the way;
3. the real conversion: `none` (float32), `float16` (float16 weights), `dynamic`
   (int8 weights, float activations) or `int8` (full integer: weights and activations,
   calibrated on representative token ids from the training split, padded exactly as
   at inference; the model's masking keeps padded positions from stretching activation
   ranges, see `models/layers.py`);
4. the audit of the converted file: its ops, and those left in float in an int8 file.
"""

import dataclasses
import gzip
import os
import shutil
import tempfile
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from tf_effitrain.config.choices import QUANTIZATIONS
from tf_effitrain.engine import keras_of, ops_for
from tf_effitrain.errors import TfEffitrainError

__all__ = ["QUANTIZATIONS", "ExportError", "TFLiteAudit", "export_saved_model",
           "representative_rows", "convert_tflite", "audit_tflite", "export_tflite",
           "load_interpreter", "gzipped_size", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "token_ids"
OUTPUT_NAME = "logits"
# Ops that only move data between float and integer at the file's edges.
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


class ExportError(TfEffitrainError, ValueError):
    """A model or request that cannot be exported as asked; the message says why."""


@dataclasses.dataclass
class TFLiteAudit:
    """What a TFLite file contains.

    Args:
        ops: dict. Op name -> count.
        flex_ops: list of str. Ops that need the Flex (TensorFlow) delegate, or another
            custom op the standard interpreter lacks.
        float_ops: list of str. In an int8 file, ops computing in float (besides the
            QUANTIZE/DEQUANTIZE at its edges).
        dynamic_tensors: list of str. Tensors with a dimension unknown until run time.
        constant_bytes: int. Bytes of constant tensors (weights); the rest of the file
            is graph structure, names and quantization parameters.
    """

    ops: Dict[str, int]
    flex_ops: List[str]
    float_ops: List[str]
    dynamic_tensors: List[str]
    constant_bytes: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


def load_interpreter(model, delegates="xnnpack", threads=1):
    """A LiteRT interpreter for a `.tflite` path or flatbuffer bytes, tensors allocated.

    Args:
        model: str (path) or bytes.
        delegates: str. `"xnnpack"`: the default resolver, with the XNNPack delegate
            (what an app gets by default); `"none"`: builtin kernels only, no delegate.
            int8 results can differ between the two: verify under the one the app uses.
        threads: int. Interpreter threads.

    Uses `ai_edge_litert` (the maintained interpreter) and falls back to the deprecated
    `tf.lite.Interpreter` only when it is not installed.
    """
    if delegates not in ("xnnpack", "none"):
        raise ValueError(
            f"`delegates` must be 'xnnpack' or 'none'. Received: delegates={delegates!r}")
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:  # pragma: no cover - the package is a dependency
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    resolver = (OpResolverType.AUTO if delegates == "xnnpack"
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    source = {"model_path": model} if isinstance(model, str) else {"model_content": model}
    interpreter = Interpreter(**source, num_threads=threads,
                              experimental_op_resolver_type=resolver)
    try:
        interpreter.allocate_tensors()
    except RuntimeError as e:
        if "Flex" not in str(e):
            raise
        # LiteRT's wheel has no Flex delegate; TensorFlow's interpreter links it.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(
                **source, num_threads=threads,
                experimental_op_resolver_type=getattr(
                    tf.lite.experimental.OpResolverType, resolver.name))
        interpreter.allocate_tensors()
    return interpreter


def export_saved_model(model, path, sequence_length, batch_size=1):
    """Writes `model` as a SavedModel with a static int32 `token_ids` signature.

    Args:
        model: a Keras 3 or tf_keras model mapping token ids to logits.
        path: str. The SavedModel directory (replaced if it exists).
        sequence_length: int. The fixed number of token ids per example.
        batch_size: int. The fixed batch size of the signature (1 for on-device use).
    """
    if os.path.exists(path):
        shutil.rmtree(path)
    spec = tf.TensorSpec([batch_size, sequence_length], tf.int32, name=INPUT_NAME)
    ops_for(keras_of(model)).export_saved_model(model, path, [spec], OUTPUT_NAME)
    return path


def representative_rows(dataset, sequence_length, num_samples=200):
    """Token-id rows of `num_samples` examples of a batched `(ids, labels)` dataset,
    padded with 0 (or truncated) to `sequence_length`: exactly the rows the exported
    file will see, padding included."""
    rows = []
    for ids, _ in dataset:
        for row in np.asarray(ids):
            padded = np.zeros(sequence_length, np.int32)
            row = row[:sequence_length]
            padded[:len(row)] = row
            rows.append(padded)
            if len(rows) >= num_samples:
                return np.stack(rows)
    if not rows:
        raise ExportError("The representative dataset is empty: int8 calibration needs "
                          "examples from the training split.")
    return np.stack(rows)


def _converter(saved_model_dir, quantization, representative=None, allow_flex=False,
               int8_output=False):
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"`quantization` must be one of {QUANTIZATIONS}. Received: "
                          f"quantization={quantization!r}")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    builtins = (tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if quantization == "int8"
                else tf.lite.OpsSet.TFLITE_BUILTINS)
    converter.target_spec.supported_ops = [builtins] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if allow_flex else [])
    if quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        if representative is None or len(representative) == 0:
            raise ExportError("int8 quantization needs representative data (token-id "
                              "rows from the training split).")
        rows = np.asarray(representative, np.int32)

        def calibration():
            # The signature's batch is 1: one example per calibration step.
            for row in rows:
                yield {INPUT_NAME: row[None]}

        converter.representative_dataset = calibration
        # Token ids stay int32 (`inference_input_type` does not apply to them).
        if int8_output:
            converter.inference_output_type = tf.int8
    return converter


def audit_tflite(model_content):
    """The `TFLiteAudit` of a flatbuffer, read from the file itself (no interpreter: a
    file with Flex ops cannot even be loaded without the Flex delegate)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items()
                     if not k.startswith("_")}
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(model_content))
    codes = []
    for code in model.operatorCodes:
        if code.customCode:
            codes.append(code.customCode.decode() if isinstance(code.customCode, bytes)
                         else str(code.customCode))
        else:
            codes.append(builtin_names.get(max(code.builtinCode, code.deprecatedBuiltinCode),
                                           "UNKNOWN"))
    ops, float_ops, dynamic = Counter(), set(), []
    constant_bytes = sum(len(b.data) for b in model.buffers if b.data is not None)
    float32, int8 = schema.TensorType.FLOAT32, schema.TensorType.INT8
    for graph in model.subgraphs:
        tensors = graph.tensors
        # Integer activations (not just int8 weights, as in a dynamic-range file).
        quantized = any(i >= 0 and tensors[i].type == int8
                        for op in graph.operators for i in op.outputs)
        for op in graph.operators:
            name = codes[op.opcodeIndex]
            ops[name] += 1
            if quantized and name not in _BOUNDARY_OPS and any(
                    i >= 0 and tensors[i].type == float32 for i in op.outputs):
                float_ops.add(name)
        for t in tensors:
            if t.shapeSignature is not None and -1 in list(t.shapeSignature):
                dynamic.append(t.name.decode() if isinstance(t.name, bytes) else str(t.name))
    flex = sorted(name for name in ops if name.startswith("Flex"))
    custom = sorted(name for name in ops if name not in builtin_names.values()
                    and not name.startswith("Flex"))
    return TFLiteAudit(ops=dict(sorted(ops.items())), flex_ops=flex + custom,
                       float_ops=sorted(float_ops), dynamic_tensors=sorted(dynamic),
                       constant_bytes=int(constant_bytes))


def convert_tflite(saved_model_dir, quantization="none", representative=None,
                   allow_flex=False, int8_output=False):
    """Audits, then converts a SavedModel; returns `(flatbuffer bytes, TFLiteAudit)`.

    Raises:
        ExportError: ops that need Flex without `allow_flex`, dynamic dimensions, or a
            conversion failure, each with what to do.
    """
    try:
        probe = _converter(saved_model_dir, "none", allow_flex=True).convert()
    except Exception as e:  # the converter raises ConverterError and friends
        raise ExportError(f"TFLite conversion failed: {' '.join(str(e).split())[:800]}") \
            from None
    probe_audit = audit_tflite(probe)
    if probe_audit.flex_ops and not allow_flex:
        raise ExportError(
            f"The model needs ops that TFLite has no builtin kernel for: "
            f"{', '.join(probe_audit.flex_ops)}. They run only with the Flex (Select TF "
            "ops) delegate linked into the app (larger binary). Pass `--allow-flex` "
            "(`allow_flex=True`) to accept that, or replace those ops in the model.")
    if probe_audit.dynamic_tensors:
        raise ExportError(
            f"Tensors with dynamic dimensions: {probe_audit.dynamic_tensors[:5]}. The "
            "exported signature must be static: set a fixed `sequence_length`.")
    try:
        content = _converter(saved_model_dir, quantization, representative, allow_flex,
                             int8_output).convert()
    except Exception as e:
        raise ExportError(
            f"TFLite {quantization} conversion failed: {' '.join(str(e).split())[:800]}"
        ) from None
    return content, audit_tflite(content)


def export_tflite(model, path, quantization="none", representative_data=None,
                  sequence_length=128, allow_flex=False, int8_output=False,
                  num_samples=200):
    """Exports a Keras model (Keras 3 or tf_keras) to a `.tflite` file.

    Args:
        model: a model mapping int32 token ids (batch, seq) to logits.
        path: str. The `.tflite` file to write.
        quantization: str. `"none"`, `"float16"`, `"dynamic"` or `"int8"`.
        representative_data: for `int8`: a batched `(ids, labels)` dataset (e.g. the
            training split) or an int32 array of token-id rows.
        sequence_length: int. The file's fixed input length (ids are padded with 0).
        allow_flex: bool. Accept ops that need the Flex delegate.
        int8_output: bool. For `int8`: int8 logits (dequantize with the output's scale
            and zero point) instead of float32.
        num_samples: int. Representative rows taken from a dataset.

    Returns:
        The `TFLiteAudit` of the written file.

    Example:

    ```python
    audit = et.export_tflite(model, "model_int8.tflite", quantization="int8",
                             representative_data=data.train, sequence_length=128)
    print(audit.ops, audit.float_ops)
    ```
    """
    rows = representative_data
    if quantization == "int8" and rows is not None and not isinstance(rows, np.ndarray):
        rows = representative_rows(rows, sequence_length, num_samples)
    workdir = tempfile.mkdtemp(prefix="tf_effitrain_export_")
    try:
        saved = export_saved_model(model, os.path.join(workdir, "saved_model"),
                                   sequence_length)
        content, audit = convert_tflite(saved, quantization, rows, allow_flex, int8_output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return audit


def gzipped_size(path):
    """Bytes of the file after gzip -9 (what a download or app bundle would carry)."""
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), 9))
