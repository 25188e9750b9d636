"""Data: sources, WordPiece tokenization, deterministic splits, bucketed batching."""

from tf_effitrain.data.augment import token_shuffle
from tf_effitrain.data.batching import batch_dataset, default_boundaries
from tf_effitrain.data.pipeline import DataBundle, prepare_data, tokenize_dataset
from tf_effitrain.data.sources import DataError, Examples, load_examples
from tf_effitrain.data.splits import split_indices
from tf_effitrain.data.tokenizer import (
    PAD_ID,
    RESERVED_TOKENS,
    learn_vocabulary,
    load_or_learn_vocabulary,
    make_tokenizer,
)

__all__ = [
    "PAD_ID",
    "RESERVED_TOKENS",
    "DataBundle",
    "DataError",
    "Examples",
    "batch_dataset",
    "default_boundaries",
    "learn_vocabulary",
    "load_examples",
    "load_or_learn_vocabulary",
    "make_tokenizer",
    "prepare_data",
    "split_indices",
    "token_shuffle",
    "tokenize_dataset",
]
