"""Example sources: JSONL, CSV, a text directory (one folder per class), tfds.

Each source yields `(text, raw_label, where)` triples; `load_examples` checks texts,
turns raw labels into class indices, and fails with a message naming the file, line or
label when the data cannot be used. JSONL, CSV and text directories are read with plain
Python (no TensorFlow), so bad data is reported in about a second. Nothing downloads:
a tfds dataset must already be prepared in `data_dir` (tests use
`tfds.testing.mock_data`).

Labels are treated the same way in every source:
- strings are class names; integers (and integral floats such as `1.0`, and strings
  that spell an integer canonically, such as CSV's `"3"` but not `"007"`) are class
  *indices* when they are exactly `0..K-1`, otherwise class names (years such as 2019
  and 2024 make 2 classes, not 2025);
- booleans are the names `"false"` and `"true"`;
- null, non-integral numbers and other types are errors naming the example.
"""

import csv
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import List

from tf_effitrain.errors import DataError, DataWarning

__all__ = ["Examples", "DataError", "DataWarning", "load_examples", "read_text_file"]


@dataclass
class Examples:
    """Texts with integer labels in `[0, len(class_names))`."""

    texts: List[str]
    labels: List[int]
    class_names: List[str]

    def __len__(self):
        return len(self.texts)


def read_text_file(path, what="File"):
    """The whole UTF-8 text of `path` (a leading byte-order mark, as Excel writes, is
    dropped); a `DataError` with the line of a bad byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}). {what} must be "
            "UTF-8 text: convert it, e.g. `iconv -f latin1 -t utf-8 in > out`."
        ) from None


def _require_file(path, what, source):
    if os.path.isdir(path):
        raise DataError(
            f"`data.path` is a directory: {path!r}. Source {source!r} reads one {what}; "
            "point `data.path` at it (or use `data.source: text_dir` for one folder per "
            "class)."
        )
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
    _require_file(cfg.path, "JSONL file", "jsonl")
    text = read_text_file(cfg.path, "A JSONL file")
    # Split on "\n" only: `str.splitlines` also splits on U+2028 and friends, which
    # JSON writers leave unescaped inside strings.
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{cfg.path}:{i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object per line, got "
                            f"{type(record).__name__}.")
        yield (_field(record, cfg.text_field, where, "text field"),
               _field(record, cfg.label_field, where, "label field"), where)


def _read_csv(cfg):
    _require_file(cfg.path, "CSV file", "csv")
    text = read_text_file(cfg.path, "A CSV file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        end = 1  # the header's last line
        for record in reader:
            # A quoted field can span lines: name the record's first line.
            where = f"{cfg.path}:{end + 1}"
            end = reader.line_num
            yield (_field(record, cfg.text_field, where, "text field"),
                   _field(record, cfg.label_field, where, "label field"), where)
    except csv.Error as e:
        raise DataError(f"{cfg.path}:{reader.line_num}: not valid CSV ({e}).") from None


def _read_text_dir(cfg):
    if not os.path.exists(cfg.path):
        raise DataError(f"Text directory not found: {cfg.path!r}. Check `data.path`.")
    if not os.path.isdir(cfg.path):
        raise DataError(f"`data.path` must be a directory for source 'text_dir' (one "
                        f"folder per class): {cfg.path!r} is a file.")
    for label in sorted(os.listdir(cfg.path)):
        folder = os.path.join(cfg.path, label)
        if not os.path.isdir(folder) or label.startswith("."):
            continue
        names = [n for n in sorted(os.listdir(folder))
                 if os.path.isfile(os.path.join(folder, n)) and not n.startswith(".")]
        if not names:
            raise DataError(
                f"Class folder {folder!r} holds no files: add examples or remove the "
                "folder (every class needs examples)."
            )
        for name in names:
            path = os.path.join(folder, name)
            yield read_text_file(path, "A text file"), label, path


def _read_tfds(cfg):
    import tensorflow_datasets as tfds  # Heavy; only tfds runs pay for it.

    try:
        ds, info = tfds.load(cfg.tfds_name, split=cfg.tfds_split, with_info=True,
                             download=False)
    except Exception as e:  # tfds raises several types for "not prepared" / bad names.
        raise DataError(
            f"Could not load tfds dataset {cfg.tfds_name!r} split {cfg.tfds_split!r} "
            f"without downloading: {' '.join(str(e).split())}. Prepare it first with "
            "`tfds build` on a machine with network, or point TFDS_DATA_DIR at a "
            "prepared copy."
        ) from None
    feature = info.features[cfg.label_field] if cfg.label_field in info.features else None
    names = list(getattr(feature, "names", None) or [])
    where = f"tfds {cfg.tfds_name}"
    for i, record in enumerate(tfds.as_numpy(ds)):
        text = _field(record, cfg.text_field, where, "text field")
        label = _field(record, cfg.label_field, where, "label field")
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        label = label.item() if hasattr(label, "item") else label
        if names and isinstance(label, int) and 0 <= label < len(names):
            label = names[label]
        yield text, label, f"{where} example {i}"


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "text_dir": _read_text_dir,
            "tfds": _read_tfds}


def _clean_text(text, where, field):
    if isinstance(text, str):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return str(text)
    what = "null" if text is None else f"a {type(text).__name__}"
    raise DataError(f"{where}: `{field}` is {what}, not text. Fix or remove the example.")


def _clean_label(raw, where):
    """A label as an int (index candidate) or a str (class name)."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        stripped = raw.strip()
        # Only a canonical integer ("3", "-1"; not "007", "²" or "--1") is an index.
        if re.fullmatch(r"-?(0|[1-9][0-9]*)", stripped):
            return int(stripped)
        return raw
    what = "null" if raw is None else repr(raw)
    raise DataError(
        f"{where}: label {what} is not a class name (string) or an integer class "
        "index. Fix the example's label."
    )


def _class_names(labels, classes):
    """Class names, and whether integer labels are indices into them."""
    if classes:
        return list(classes), True
    ints = [x for x in labels if isinstance(x, int)]
    if len(ints) == len(labels):
        if set(ints) == set(range(max(ints) + 1)):
            return [str(i) for i in range(max(ints) + 1)], True
        return [str(i) for i in sorted(set(ints))], False  # e.g. years: names
    return sorted({str(x) for x in labels}), False


def load_examples(cfg):
    """Reads every example of the configured source.

    Args:
        cfg: `DataConfig`.

    Returns:
        `Examples` with labels mapped to indices of `class_names` (`cfg.classes`, or
        the tfds ClassLabel names, or the distinct labels: see the module docstring).

    Raises:
        DataError: missing or unreadable path, non-UTF-8 text, a malformed record, a
            null or empty text or label, no examples, fewer than 2 classes (named or
            present), or a label outside `cfg.classes`.
    """
    texts, labels, places = [], [], []
    for text, raw, where in _READERS[cfg.source](cfg):
        text = _clean_text(text, where, cfg.text_field)
        if not text.strip():
            raise DataError(f"{where}: `{cfg.text_field}` is empty: it tokenizes to "
                            "nothing. Fix or remove the example.")
        texts.append(text)
        labels.append(_clean_label(raw, where))
        places.append(where)
    if not texts:
        raise DataError(
            f"No examples found for source {cfg.source!r} at "
            f"{cfg.tfds_name if cfg.source == 'tfds' else cfg.path!r}."
        )
    class_names, ints_are_indices = _class_names(labels, cfg.classes)
    if len(class_names) < 2:
        raise DataError(
            f"Need at least 2 classes to train a classifier. Found: {class_names} in "
            f"{cfg.tfds_name if cfg.source == 'tfds' else cfg.path!r}. Check "
            f"`data.label_field` ({cfg.label_field!r}) and `data.path`."
        )
    index = {name: i for i, name in enumerate(class_names)}
    indices = []
    for label, where in zip(labels, places):
        i = index.get(str(label))
        if i is None and ints_are_indices and isinstance(label, int) and (
                0 <= label < len(class_names)):
            i = label
        if i is None:
            shown = class_names[:10] + (["..."] if len(class_names) > 10 else [])
            raise DataError(
                f"{where}: label {label!r} is out of range: not one of the "
                f"{len(class_names)} classes {shown}"
                + (f" nor an index below {len(class_names)}" if ints_are_indices else "")
                + ". Fix the data or `data.classes`."
            )
        indices.append(i)
    if len(set(indices)) < 2:
        raise DataError(
            f"All {len(indices)} examples are of the class {class_names[indices[0]]!r}: a "
            "classifier needs examples of at least 2 classes. Check `data.label_field`.")
    if not ints_are_indices and all(isinstance(x, int) for x in labels):
        warnings.warn(
            f"Integer labels {class_names[:5]}{'...' if len(class_names) > 5 else ''} "
            f"are not the indices 0..{len(class_names) - 1}: they are used as class "
            "names. Set `data.classes` to fix names and order.", DataWarning, stacklevel=2)
    return Examples(texts=texts, labels=indices, class_names=class_names)
