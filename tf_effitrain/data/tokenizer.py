"""WordPiece tokenization with keras-nlp: vocabulary learned once, cached in the run dir."""

import os

import tensorflow as tf

__all__ = ["RESERVED_TOKENS", "PAD_ID", "learn_vocabulary", "load_or_learn_vocabulary",
           "make_tokenizer"]

# [PAD] must be id 0: the models treat token id 0 as padding.
RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID = 0


def learn_vocabulary(texts, vocab_size, lowercase=True):
    """Learns a WordPiece vocabulary (list of str, `[PAD]` first) from `texts`."""
    import keras_nlp  # Keras 3 package; imported lazily (tf_keras runs may not need it).

    ds = tf.data.Dataset.from_tensor_slices(list(texts)).batch(1024)
    return keras_nlp.tokenizers.compute_word_piece_vocabulary(
        ds, vocabulary_size=vocab_size, lowercase=lowercase,
        reserved_tokens=RESERVED_TOKENS,
    )


def load_or_learn_vocabulary(path, texts, vocab_size, lowercase=True):
    """Reads the vocabulary at `path` if present; else learns it and writes it there."""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f if line.rstrip("\n")]
        if not vocab or vocab[0] != RESERVED_TOKENS[0]:
            raise ValueError(
                f"Cached vocabulary {path!r} does not start with {RESERVED_TOKENS[0]!r}; "
                "delete it to learn a new one."
            )
        return vocab
    vocab = learn_vocabulary(texts, vocab_size, lowercase)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
    return vocab


def make_tokenizer(vocab, lowercase=True):
    """A keras-nlp `WordPieceTokenizer` (ragged int32 output) usable in `tf.data.map`."""
    import keras_nlp

    return keras_nlp.tokenizers.WordPieceTokenizer(
        vocabulary=vocab, lowercase=lowercase, oov_token="[UNK]", dtype="int32"
    )
