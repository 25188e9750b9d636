"""Data: sources (in memory or streamed), WordPiece tokenization, deterministic splits,
bucketed or packed batching.

Names load on first use: reading and checking examples (`load_examples`) needs no
TensorFlow, so bad data is reported at once.
"""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "token_shuffle": "tf_effitrain.data.augment",
    "batch_dataset": "tf_effitrain.data.batching",
    "default_boundaries": "tf_effitrain.data.batching",
    "DataBundle": "tf_effitrain.data.pipeline",
    "VOCAB_FILE": "tf_effitrain.data.pipeline",
    "prepare_data": "tf_effitrain.data.pipeline",
    "tokenize_dataset": "tf_effitrain.data.pipeline",
    "unpacked": "tf_effitrain.data.pipeline",
    "pack_dataset": "tf_effitrain.data.packing",
    "packed_accuracy": "tf_effitrain.data.packing",
    "balanced_class_weights": "tf_effitrain.data.weights",
    "class_weighted": "tf_effitrain.data.weights",
    "DataError": "tf_effitrain.errors",
    "DataWarning": "tf_effitrain.errors",
    "Examples": "tf_effitrain.data.sources",
    "load_examples": "tf_effitrain.data.sources",
    "split_indices": "tf_effitrain.data.splits",
    "hash_split": "tf_effitrain.data.splits",
    "expand_paths": "tf_effitrain.data.sources",
    "StreamInfo": "tf_effitrain.data.stream",
    "scan": "tf_effitrain.data.stream",
    "stream_examples": "tf_effitrain.data.stream",
    "pipeline_files": "tf_effitrain.data.stream",
    "PAD_ID": "tf_effitrain.data.tokenizer",
    "RESERVED_TOKENS": "tf_effitrain.data.tokenizer",
    "learn_vocabulary": "tf_effitrain.data.tokenizer",
    "load_or_learn_vocabulary": "tf_effitrain.data.tokenizer",
    "make_tokenizer": "tf_effitrain.data.tokenizer",
    "read_vocabulary": "tf_effitrain.data.tokenizer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
