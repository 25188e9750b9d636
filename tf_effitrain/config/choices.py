"""Every choice list of the toolkit, in one place.

The config schema validates against these tuples, and every module that branches on a
choice imports them from here, so a new option is added once.
"""

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_KINDS",
    "BATCHING",
    "DECAYS",
    "DELEGATES",
    "EXPORT_FORMATS",
    "ENGINES",
    "MODEL_KINDS",
    "NORMS",
    "NORM_POSITIONS",
    "OPTIMIZERS",
    "PRECISIONS",
    "QUANTIZATIONS",
    "SOURCES",
    "STRATEGIES",
]

ENGINES = ("keras3", "tf_keras")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16", "bfloat16")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
VOCAB_LEARNERS = ("tokenizers", "keras_hub")
SOURCES = ("jsonl", "csv", "tfrecord", "text_dir", "tfds")
BATCHING = ("bucket", "fixed", "pack")
MODEL_KINDS = ("transformer", "bert_backbone")
ACTIVATIONS = ("gelu", "relu", "silu")
NORMS = ("layer", "batch", "rms")
NORM_POSITIONS = ("pre", "post")
ATTENTION_KINDS = ("full", "local", "block_sparse")
OPTIMIZERS = ("adamw", "adafactor", "lamb", "lion", "sgd")
DECAYS = ("constant", "cosine", "linear", "exponential", "polynomial")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
EXPORT_FORMATS = ("tflite", "saved_model")
DELEGATES = ("xnnpack", "none")
