"""The vocabulary: learned fast and deterministically on a seeded sample, given as a
file, or found in the cache that runs share; read by the one tokenizer."""

import os

import numpy as np
import pytest

from harness import FORTUNES, run_python, tiny_config
from tf_effitrain.config import DataConfig
from tf_effitrain.data import load_examples, prepare_data
from tf_effitrain.data import tokenizer as tok
from tf_effitrain.errors import DataError


@pytest.fixture(scope="module")
def fortunes():
    return load_examples(DataConfig(path=FORTUNES)).texts


def _learn_in_fresh_process(texts_path, size):
    done = run_python(f"""
        import hashlib
        from tf_effitrain.data.tokenizer import learn_vocabulary
        texts = open({texts_path!r}, encoding="utf-8").read().split("\\x00")
        vocab = learn_vocabulary(texts, {size})
        print(len(vocab), hashlib.sha256("\\n".join(vocab).encode()).hexdigest())
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-2:]


def test_the_fast_learner_gives_the_same_vocabulary_in_every_process(fortunes, tmp_path):
    """The `tokenizers` trainer alone differs between processes on ties (hash-map
    order); with the continuations registered up front it must not."""
    path = tmp_path / "texts.txt"
    path.write_text("\x00".join(fortunes[:1500]), encoding="utf-8")
    first = _learn_in_fresh_process(str(path), 2000)
    for _ in range(3):
        assert _learn_in_fresh_process(str(path), 2000) == first
    assert first[0] == "2000"  # exactly the requested size


def test_the_sample_is_seeded_and_bounded(fortunes):
    a = tok.vocabulary_sample(fortunes, 500, seed=1)
    assert len(a) == 500 and a == tok.vocabulary_sample(fortunes, 500, seed=1)
    assert a != tok.vocabulary_sample(fortunes, 500, seed=2)
    assert set(a) <= set(fortunes)
    assert tok.vocabulary_sample(fortunes, None, seed=1) == list(fortunes)
    assert tok.vocabulary_sample(fortunes[:10], 500, seed=1) == list(fortunes[:10])


@pytest.mark.parametrize("learner", tok.LEARNERS)
def test_either_learner_serves_the_tokenizer(fortunes, learner):
    """Both learners split words as keras-hub's tokenizer does: almost no unknown
    tokens on the texts they learned from, reserved tokens first."""
    texts = fortunes[:600]
    vocab = tok.learn_vocabulary(texts, 800, learner=learner)
    assert vocab[: len(tok.RESERVED_TOKENS)] == tok.RESERVED_TOKENS
    assert len(set(vocab)) == len(vocab)
    ids = np.concatenate([np.asarray(row) for row in tok.make_tokenizer(vocab)(texts)])
    unknown = np.mean(ids == vocab.index("[UNK]"))
    assert unknown < 0.005, (learner, unknown)
    with pytest.raises(ValueError, match="`learner` must be one of"):
        tok.learn_vocabulary(texts, 800, learner="bpe")


def test_a_given_vocabulary_file_is_used_and_checked(tmp_path, small_jsonl):
    good = tmp_path / "given.txt"
    vocab = ["[PAD]", "[UNK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    good.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    cfg = DataConfig(path=small_jsonl, vocab_file=str(good), max_length=24)
    bundle = prepare_data(cfg, seed=0, run_dir=str(tmp_path / "run"))
    assert bundle.vocab == vocab
    assert (tmp_path / "run" / "vocab.txt").read_text(encoding="utf-8").split() == vocab
    bad = tmp_path / "bad.txt"
    bad.write_text("[UNK]\n[PAD]\nword\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"must have `\[PAD\]` on its first line"):
        prepare_data(DataConfig(path=small_jsonl, vocab_file=str(bad)), run_dir=None)
    with pytest.raises(DataError, match="`data.vocab_file` not found: '/nowhere/v.txt'"):
        prepare_data(DataConfig(path=small_jsonl, vocab_file="/nowhere/v.txt"),
                     run_dir=None)


def test_runs_on_the_same_data_share_the_cached_vocabulary(tmp_path, small_jsonl,
                                                          monkeypatch):
    monkeypatch.setenv("TF_EFFITRAIN_CACHE", str(tmp_path / "cache"))
    lines = []
    cfg = DataConfig(path=small_jsonl, vocab_size=300, max_length=24)
    first = prepare_data(cfg, seed=0, run_dir=str(tmp_path / "a"), log=lines.append)
    assert any("learning 300 tokens" in line for line in lines)
    assert len(os.listdir(tmp_path / "cache" / "vocab")) == 1

    def no_learning(*args, **kwargs):
        raise AssertionError("learned again despite the cache")

    monkeypatch.setattr(tok, "learn_vocabulary", no_learning)
    lines.clear()
    second = prepare_data(cfg, seed=0, run_dir=str(tmp_path / "b"), log=lines.append)
    assert second.vocab == first.vocab and any("from the cache" in x for x in lines)
    # Another split (seed) or size is another key: learned, not taken from the cache.
    with pytest.raises(AssertionError, match="despite the cache"):
        prepare_data(cfg, seed=1, run_dir=str(tmp_path / "c"))
    with pytest.raises(AssertionError, match="despite the cache"):
        prepare_data(DataConfig(path=small_jsonl, vocab_size=301, max_length=24), seed=0,
                     run_dir=str(tmp_path / "d"))
    # Off: never read nor written.
    off = DataConfig(path=small_jsonl, vocab_size=300, max_length=24, vocab_cache=False)
    with pytest.raises(AssertionError, match="despite the cache"):
        prepare_data(off, seed=0, run_dir=str(tmp_path / "e"))


def test_a_run_learns_from_the_seeded_sample_of_its_training_split(tmp_path, small_jsonl):
    from tf_effitrain.data.splits import split_indices
    from tf_effitrain.training import evaluate_run, train

    run_dir = tmp_path / "run"
    config = tiny_config(small_jsonl, str(run_dir), "data.vocab_sample=40",
                         "training.epochs=1")
    result = train(config)
    vocab = [t for t in (run_dir / "vocab.txt").read_text(encoding="utf-8").split("\n") if t]
    examples = load_examples(config.data)
    train_idx = split_indices(examples.labels, 0.1, 0.1, config.runtime.seed)["train"]
    train_texts = [examples.texts[i] for i in train_idx]
    sample = tok.vocabulary_sample(train_texts, 40, config.runtime.seed)
    assert len(sample) == 40 and vocab == tok.learn_vocabulary(sample, 300)
    assert vocab != tok.learn_vocabulary(train_texts, 300)  # the sample mattered
    assert evaluate_run(str(run_dir))["accuracy"] == pytest.approx(result.test["accuracy"])
