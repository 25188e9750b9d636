"""Raw text in, labels out: the training tokenizer beside any exported model.

A model file (`.keras` or `.tflite`) is accompanied by `tokenizer.json` (vocabulary
file, lowercasing, `max_length`, the TFLite file's `sequence_length`, class names) and
`vocab.txt` in its folder: `train` writes them into the run directory, `export` beside
each file. Tokenization goes through the same `tokenize_dataset` as training, so a text
becomes exactly the ids the model was trained and evaluated on.
"""

import json
import os

import numpy as np

from tf_effitrain.errors import RunDirError

__all__ = ["TOKENIZER_FILE", "write_tokenizer_settings", "read_tokenizer_settings",
           "TextClassifier"]

TOKENIZER_FILE = "tokenizer.json"


def write_tokenizer_settings(folder, vocab, data_cfg, class_names, sequence_length=None):
    """Writes `vocab.txt` and `tokenizer.json` into `folder` (for `TextClassifier`)."""
    os.makedirs(folder, exist_ok=True)
    vocab_path = os.path.join(folder, "vocab.txt")
    if not os.path.isfile(vocab_path):
        with open(vocab_path, "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
    settings = {
        "vocabulary": "vocab.txt",
        "lowercase": bool(data_cfg.lowercase),
        "max_length": int(data_cfg.max_length),
        "sequence_length": int(sequence_length or data_cfg.max_length),
        "class_names": list(class_names),
        "pad_id": 0,
        "input": "token_ids",
        "output": "logits",
    }
    with open(os.path.join(folder, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    return settings


def read_tokenizer_settings(model_path):
    """The `tokenizer.json` beside `model_path`, with the vocabulary loaded."""
    from tf_effitrain.data.tokenizer import read_vocabulary

    folder = os.path.dirname(os.path.abspath(model_path))
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise RunDirError(
            f"No {TOKENIZER_FILE} beside {model_path!r}: predict needs the tokenizer the "
            "model was trained with. Use a model from a `tf-effitrain train` run "
            "directory or an `export` folder.")
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    settings["vocab"] = read_vocabulary(os.path.join(folder, settings["vocabulary"]))
    return settings


class TextClassifier:
    """Classifies raw texts with a `.keras` or `.tflite` model and its tokenizer.

    Args:
        model_path: str. A `model.keras` of a run directory or an exported `.tflite`
            file, with `tokenizer.json` and `vocab.txt` beside it.
        delegates: str. For `.tflite`: `"xnnpack"` or `"none"`.
        threads: int. For `.tflite`: interpreter threads.

    Example:

    ```python
    classifier = et.TextClassifier("runs/demo/export/model_int8.tflite")
    labels, probabilities = classifier.predict(["Klingons on the starboard bow!"])
    ```
    """

    def __init__(self, model_path, delegates="xnnpack", threads=1):
        if not os.path.isfile(model_path):
            raise RunDirError(f"Model file not found: {model_path!r}.")
        self.model_path = model_path
        self.settings = read_tokenizer_settings(model_path)
        self.class_names = self.settings["class_names"]
        self.is_tflite = model_path.endswith(".tflite")
        if self.is_tflite:
            from tf_effitrain.export.tflite import load_interpreter

            interpreter = load_interpreter(model_path, delegates, threads)
            self._runner = interpreter.get_signature_runner("serving_default")
            self._output = interpreter.get_output_details()[0]
        else:
            import keras
            import tf_keras

            for module in (keras, tf_keras):  # whichever engine saved it
                try:
                    self._model = module.models.load_model(model_path, compile=False)
                    break
                except Exception as e:  # noqa: PERF203 - try the other engine
                    error = e
            else:
                raise RunDirError(f"Could not load {model_path!r}: {error}") from None

    def token_ids(self, texts):
        """The training pipeline's token ids of each text (int32 arrays)."""
        from tf_effitrain.data.pipeline import tokenize_dataset
        from tf_effitrain.data.tokenizer import make_tokenizer

        tokenizer = make_tokenizer(self.settings["vocab"], self.settings["lowercase"])
        ds = tokenize_dataset(list(texts), [0] * len(texts), tokenizer,
                              self.settings["max_length"])
        return [np.asarray(ids, np.int32) for ids, _ in ds.as_numpy_iterator()]

    def _pad(self, ids, length):
        rows = np.zeros((len(ids), length), np.int32)
        for i, row in enumerate(ids):
            row = row[:length]
            rows[i, :len(row)] = row
        return rows

    def logits(self, texts):
        """Logits of each text, (n, classes) float32."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(self.class_names)), np.float32)
        ids = self.token_ids(texts)
        if self.is_tflite:
            rows = self._pad(ids, self.settings["sequence_length"])
            scale, zero = self._output["quantization"]
            out = []
            for row in rows:
                value = self._runner(token_ids=row[None])["logits"].astype(np.float32)
                if self._output["dtype"] == np.int8 and scale:
                    value = (value - zero) * scale
                out.append(value[0])
            return np.stack(out)
        # Padding with id 0 never changes a prediction: one padded batch.
        rows = self._pad(ids, max(1, max(len(r) for r in ids)))
        return np.asarray(self._model(rows, training=False), np.float32)

    def predict(self, texts):
        """`(labels, probabilities)`: the class name and the softmax of each text."""
        logits = self.logits(texts)
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities = shifted / shifted.sum(-1, keepdims=True)
        return [self.class_names[i] for i in probabilities.argmax(-1)], probabilities
