"""WordPiece tokenization with keras-nlp: vocabulary learned once, cached in the run dir."""

import os

import tensorflow as tf

__all__ = ["RESERVED_TOKENS", "PAD_ID", "learn_vocabulary", "load_or_learn_vocabulary",
           "make_tokenizer", "read_vocabulary"]

# [PAD] must be id 0: the models treat token id 0 as padding.
RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID = 0


def learn_vocabulary(texts, vocab_size, lowercase=True):
    """Learns a WordPiece vocabulary (list of str, `[PAD]` first) from `texts`."""
    import keras_hub  # Keras 3 package (keras-nlp re-exports it); imported lazily.

    ds = tf.data.Dataset.from_tensor_slices(list(texts)).batch(1024)
    return keras_hub.tokenizers.compute_word_piece_vocabulary(
        ds, vocabulary_size=vocab_size, lowercase=lowercase,
        reserved_tokens=RESERVED_TOKENS,
    )


def read_vocabulary(path):
    """The vocabulary cached at `path`; a `DataError` naming the file if it is unusable."""
    from tf_effitrain.data.sources import read_text_file
    from tf_effitrain.errors import DataError

    fix = f"Delete {path!r} to learn a new vocabulary."
    try:
        text = read_text_file(path, "A vocabulary file")
    except DataError as e:
        where = str(e).split(": not valid UTF-8")[0]
        raise DataError(f"Cached vocabulary is corrupt: {where}: not valid UTF-8. {fix}") \
            from None
    vocab = [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]
    if vocab[: len(RESERVED_TOKENS)] != RESERVED_TOKENS:
        raise DataError(
            f"Cached vocabulary {path!r} does not start with the reserved tokens "
            f"{RESERVED_TOKENS}: it is not one this toolkit wrote, or it is damaged. {fix}")
    if len(set(vocab)) != len(vocab):
        raise DataError(f"Cached vocabulary {path!r} repeats tokens: it is damaged. {fix}")
    return vocab


def load_or_learn_vocabulary(path, texts, vocab_size, lowercase=True):
    """Reads the vocabulary at `path` if present; else learns it and writes it there."""
    if path and os.path.isfile(path):
        return read_vocabulary(path)
    vocab = learn_vocabulary(texts, vocab_size, lowercase)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
    return vocab


def make_tokenizer(vocab, lowercase=True):
    """A keras-nlp `WordPieceTokenizer` (ragged int32 output) usable in `tf.data.map`."""
    import keras_hub

    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=vocab, lowercase=lowercase, oov_token="[UNK]", dtype="int32"
    )
