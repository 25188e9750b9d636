"""Export: TFLite (float32, float16, dynamic-range, int8) and SavedModel, audited,
verified by running the file, and usable on raw text (`TextClassifier`)."""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "QUANTIZATIONS": "tf_effitrain.export.tflite",
    "ExportError": "tf_effitrain.export.tflite",
    "TFLiteAudit": "tf_effitrain.export.tflite",
    "audit_tflite": "tf_effitrain.export.tflite",
    "convert_tflite": "tf_effitrain.export.tflite",
    "export_saved_model": "tf_effitrain.export.tflite",
    "export_tflite": "tf_effitrain.export.tflite",
    "load_interpreter": "tf_effitrain.export.tflite",
    "representative_rows": "tf_effitrain.export.tflite",
    "debug_quantization": "tf_effitrain.export.verify",
    "keras_reference": "tf_effitrain.export.verify",
    "run_tflite": "tf_effitrain.export.verify",
    "verify_tflite": "tf_effitrain.export.verify",
    "TextClassifier": "tf_effitrain.export.predict",
    "write_tokenizer_settings": "tf_effitrain.export.predict",
    "export_run": "tf_effitrain.export.run_export",
    "ExportPlugin": "tf_effitrain.export.plugin",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
