"""WordPiece tokenization: a vocabulary learned once (fast, on a seeded sample of the
training split) or given, cached by content, and keras-hub's `WordPieceTokenizer`
everywhere text becomes ids (training, evaluation, prediction, export).

Two learners, picked by measurement (`docs/benchmarks.md`, "Vocabulary learning"):
`"tokenizers"` (the default: the `tokenizers` package's Rust WordPiece trainer, a
keras-hub dependency; 43x faster than keras-hub's on 5,000 texts and gives the requested
size exactly) and `"keras_hub"` (keras-hub's `compute_word_piece_vocabulary`, a Python
learner from tensorflow-text). Both split words the way keras-hub's tokenizer does
(whitespace and punctuation, CJK characters, lower-casing when `lowercase`; accents
are kept), so either vocabulary serves the same tokenizer.
"""

import hashlib
import os
import random
import time

import tensorflow as tf

__all__ = ["RESERVED_TOKENS", "PAD_ID", "LEARNERS", "learn_vocabulary",
           "load_or_learn_vocabulary", "make_tokenizer", "read_vocabulary",
           "vocabulary_sample", "cache_dir"]

# [PAD] must be id 0: the models treat token id 0 as padding.
RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID = 0
LEARNERS = ("tokenizers", "keras_hub")
# Bumped when a learner's output for the same texts changes (it keys the cache).
_LEARNER_VERSION = {"tokenizers": 1, "keras_hub": 1}


def learn_vocabulary(texts, vocab_size, lowercase=True, learner="tokenizers"):
    """Learns a WordPiece vocabulary (list of str, the reserved tokens first) from `texts`.

    Args:
        texts: sequence of str.
        vocab_size: int. Target size; the vocabulary can be larger when the texts' own
            alphabet (every character, and its `##` continuation) needs more room.
        lowercase: bool. Lower-case first (as the tokenizer will).
        learner: str. One of `LEARNERS` (module docstring).
    """
    if learner == "tokenizers":
        return _learn_with_tokenizers(texts, vocab_size, lowercase)
    if learner != "keras_hub":
        raise ValueError(f"`learner` must be one of {list(LEARNERS)}. Received: "
                         f"learner={learner!r}")
    import keras_hub  # Keras 3 package (keras-nlp re-exports it); imported lazily.

    ds = tf.data.Dataset.from_tensor_slices(list(texts)).batch(1024)
    return keras_hub.tokenizers.compute_word_piece_vocabulary(
        ds, vocabulary_size=vocab_size, lowercase=lowercase,
        reserved_tokens=RESERVED_TOKENS,
    )


def _learn_with_tokenizers(texts, vocab_size, lowercase):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # keras-hub's tokenizer normalizes and splits the same way (see `make_tokenizer`).
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False,
        lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    characters = set()
    for text in texts:
        characters.update(tokenizer.normalizer.normalize_str(text))
    # The trainer numbers `##` continuation tokens in hash-map order, and breaks ties
    # between equally frequent merges by those numbers, so the same texts can give
    # other vocabularies (huggingface/tokenizers#1794). Registering every `##c` up
    # front, sorted, fixes their numbers: the result is then the same in every process.
    continuations = [f"##{c}" for c in sorted(characters) if not c.isspace()]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=RESERVED_TOKENS + continuations,
        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return [token for token, _ in by_id]


def vocabulary_sample(texts, size, seed):
    """At most `size` of `texts`, a seeded uniform sample in the original order."""
    texts = list(texts)
    if size is None or len(texts) <= size:
        return texts
    keep = sorted(random.Random(seed).sample(range(len(texts)), size))
    return [texts[i] for i in keep]


def read_vocabulary(path, given=False):
    """The vocabulary at `path`; a `DataError` naming the file if it is unusable.

    Args:
        path: str.
        given: bool. A user's file (`data.vocab_file`): it must have `[PAD]` at id 0 and
            an `[UNK]` token; otherwise (a cached file) it must start with this toolkit's
            reserved tokens.
    """
    from tf_effitrain.data.sources import read_text_file
    from tf_effitrain.errors import DataError

    fix = ("Fix `data.vocab_file`." if given else
           f"Delete {path!r} to learn a new vocabulary.")
    kind = "Vocabulary file" if given else "Cached vocabulary"
    if given and not os.path.isfile(path):
        raise DataError(f"`data.vocab_file` not found: {path!r}.")
    try:
        text = read_text_file(path, "A vocabulary file")
    except DataError as e:
        where = str(e).split(": not valid UTF-8")[0]
        raise DataError(f"{kind} is corrupt: {where}: not valid UTF-8. {fix}") from None
    vocab = [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]
    if given:
        if not vocab or vocab[0] != "[PAD]" or "[UNK]" not in vocab:
            raise DataError(
                f"{kind} {path!r} must have `[PAD]` on its first line (id 0 is padding) "
                f"and an `[UNK]` token. Received: first token {vocab[:1]}, "
                f"`[UNK]` {'present' if '[UNK]' in vocab else 'missing'}.")
    elif vocab[: len(RESERVED_TOKENS)] != RESERVED_TOKENS:
        raise DataError(
            f"{kind} {path!r} does not start with the reserved tokens "
            f"{RESERVED_TOKENS}: it is not one this toolkit wrote, or it is damaged. {fix}")
    if len(set(vocab)) != len(vocab):
        raise DataError(f"{kind} {path!r} repeats tokens: it is damaged. {fix}")
    return vocab


def cache_dir():
    """Where learned vocabularies are shared between runs: `$TF_EFFITRAIN_CACHE`, else
    `$XDG_CACHE_HOME/tf_effitrain`, else `~/.cache/tf_effitrain`; then `vocab/`."""
    root = os.environ.get("TF_EFFITRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "tf_effitrain")
    return os.path.join(root, "vocab")


def _cache_key(texts, vocab_size, lowercase, learner):
    digest = hashlib.sha256(
        f"{learner}:{_LEARNER_VERSION[learner]}:{vocab_size}:{lowercase}:{len(texts)}\n"
        .encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def _write(path, vocab):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    os.replace(partial, path)  # atomic: concurrent runs never read half a file


def load_or_learn_vocabulary(path, texts, vocab_size, lowercase=True, learner="tokenizers",
                             sample=None, seed=0, vocab_file=None, cache=False, log=None):
    """The vocabulary at `path` if present; else the given file, a cached one, or a
    newly learned one (written to `path` and the cache).

    Args:
        path: str or None. The run's vocabulary file.
        texts: sequence of str. The training split's texts.
        vocab_size, lowercase, learner: see `learn_vocabulary`.
        sample: int or None. Learn from at most this many texts (`vocabulary_sample`).
        seed: int. The sample's seed.
        vocab_file: str or None. Use this vocabulary instead of learning one.
        cache: bool. Share learned vocabularies between runs in `cache_dir()`, keyed by
            the sampled texts themselves and the learner settings: a run on the same
            data and split finds it there.
        log: callable or None. Progress lines.

    Returns:
        list of str.
    """
    log = log or (lambda line: None)
    if path and os.path.isfile(path):
        return read_vocabulary(path)
    if vocab_file:
        vocab = read_vocabulary(vocab_file, given=True)
    else:
        chosen = vocabulary_sample(texts, sample, seed)
        cached = None
        if cache:
            cached = os.path.join(cache_dir(), _cache_key(chosen, vocab_size, lowercase,
                                                          learner) + ".txt")
        if cached and os.path.isfile(cached):
            vocab = read_vocabulary(cached)
            log(f"vocabulary: {len(vocab)} tokens from the cache ({cached})")
        else:
            log(f"vocabulary: learning {vocab_size} tokens from {len(chosen):,} training "
                f"texts ({learner})" + (f", a sample of {len(texts):,}"
                                        if len(chosen) < len(texts) else ""))
            start = time.perf_counter()
            vocab = learn_vocabulary(chosen, vocab_size, lowercase, learner)
            log(f"vocabulary: {len(vocab)} tokens in {time.perf_counter() - start:.1f} s")
            if cached:
                _write(cached, vocab)
    if path:
        _write(path, vocab)
    return vocab


def make_tokenizer(vocab, lowercase=True):
    """A keras-nlp `WordPieceTokenizer` (ragged int32 output) usable in `tf.data.map`."""
    import keras_hub

    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=vocab, lowercase=lowercase, oov_token="[UNK]", dtype="int32"
    )
