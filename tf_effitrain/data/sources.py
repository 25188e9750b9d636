"""Example sources: JSONL, CSV, a text directory (one folder per class), tfds.

Each source yields `(text, raw_label)` pairs; `load_examples` turns raw labels into class
indices, checks them, and fails with a message naming the file, line or label when the
data cannot be used. Nothing downloads: a tfds dataset must already be prepared in
`data_dir` (tests use `tfds.testing.mock_data`).
"""

import csv
import json
import os
from dataclasses import dataclass
from typing import List

__all__ = ["Examples", "DataError", "load_examples"]


class DataError(ValueError):
    """Input data that cannot be used for training; the message says what to fix."""


@dataclass
class Examples:
    """Texts with integer labels in `[0, len(class_names))`."""

    texts: List[str]
    labels: List[int]
    class_names: List[str]

    def __len__(self):
        return len(self.texts)


def _require_file(path, what):
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path!r}. Check `data.path`.")


def _field(record, name, where, kind):
    if name not in record:
        raise DataError(
            f"{where}: no `{name}` {kind}. Available: {sorted(record)}. "
            f"Set `data.{'text' if kind == 'text field' else 'label'}_field`."
        )
    return record[name]


def _read_jsonl(cfg):
    _require_file(cfg.path, "JSONL file")
    with open(cfg.path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{cfg.path}:{i}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
            yield (_field(record, cfg.text_field, where, "text field"),
                   _field(record, cfg.label_field, where, "label field"))


def _read_csv(cfg):
    _require_file(cfg.path, "CSV file")
    with open(cfg.path, encoding="utf-8", newline="") as f:
        for i, record in enumerate(csv.DictReader(f), 2):
            where = f"{cfg.path}:{i}"
            yield (_field(record, cfg.text_field, where, "text field"),
                   _field(record, cfg.label_field, where, "label field"))


def _read_text_dir(cfg):
    _require_file(cfg.path, "Text directory")
    if not os.path.isdir(cfg.path):
        raise DataError(f"`data.path` must be a directory for source 'text_dir': {cfg.path!r}")
    for label in sorted(os.listdir(cfg.path)):
        folder = os.path.join(cfg.path, label)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.startswith("."):
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield f.read(), label


def _read_tfds(cfg):
    import tensorflow_datasets as tfds  # Heavy; only tfds runs pay for it.

    try:
        ds, info = tfds.load(cfg.tfds_name, split=cfg.tfds_split, with_info=True,
                             download=False)
    except Exception as e:  # tfds raises several types for "not prepared" / bad names.
        raise DataError(
            f"Could not load tfds dataset {cfg.tfds_name!r} split {cfg.tfds_split!r} "
            f"without downloading: {e}. Prepare it first with `tfds build` on a "
            "machine with network, or point TFDS_DATA_DIR at a prepared copy."
        ) from None
    feature = info.features[cfg.label_field] if cfg.label_field in info.features else None
    names = list(getattr(feature, "names", None) or [])
    for record in tfds.as_numpy(ds):
        text = _field(record, cfg.text_field, f"tfds {cfg.tfds_name}", "text field")
        label = _field(record, cfg.label_field, f"tfds {cfg.tfds_name}", "label field")
        yield (text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text,
               names[int(label)] if names and 0 <= int(label) < len(names) else int(label))


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "text_dir": _read_text_dir,
            "tfds": _read_tfds}


def _class_index(raw, class_names):
    """Maps a raw label (class name or integer index) to its class index, or None."""
    if isinstance(raw, str) and raw in class_names:
        return class_names.index(raw)
    if _is_int_like(raw) and 0 <= int(raw) < len(class_names):
        return int(raw)
    return None


def _is_int_like(raw):
    return (isinstance(raw, int) and not isinstance(raw, bool)) or (
        isinstance(raw, str) and raw.strip().isdigit()
    )


def load_examples(cfg):
    """Reads every example of the configured source.

    Args:
        cfg: `DataConfig`.

    Returns:
        `Examples` with labels mapped to indices of `class_names` (`cfg.classes`, or
        the tfds ClassLabel names, or the sorted distinct labels).

    Raises:
        DataError: missing path, malformed record, no examples, or a label outside
            `cfg.classes` / the class range.
    """
    pairs = list(_READERS[cfg.source](cfg))
    if not pairs:
        raise DataError(
            f"No examples found for source {cfg.source!r} at "
            f"{cfg.tfds_name if cfg.source == 'tfds' else cfg.path!r}."
        )
    raw_labels = [label for _, label in pairs]
    if cfg.classes:
        class_names = list(cfg.classes)
    elif all(_is_int_like(r) for r in raw_labels):
        # Integer labels without names: classes 0..max, so "label out of range" is
        # only possible when `data.classes` is given.
        class_names = [str(i) for i in range(max(int(r) for r in raw_labels) + 1)]
        if min(int(r) for r in raw_labels) < 0:
            raise DataError(f"Labels must be >= 0. Found {min(int(r) for r in raw_labels)}.")
    else:
        class_names = sorted({str(r) for r in raw_labels})
    if len(class_names) < 2:
        raise DataError(
            f"Need at least 2 classes to train a classifier. Found: {class_names}."
        )
    labels = []
    for i, raw in enumerate(raw_labels):
        index = _class_index(raw, class_names)
        if index is None:
            raise DataError(
                f"Example {i}: label {raw!r} is out of range: not one of the "
                f"{len(class_names)} classes {class_names[:10]}"
                f"{'...' if len(class_names) > 10 else ''}. Fix the data or `data.classes`."
            )
        labels.append(index)
    texts = [str(t) for t, _ in pairs]
    return Examples(texts=texts, labels=labels, class_names=class_names)
