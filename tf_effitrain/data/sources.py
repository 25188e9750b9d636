"""Example sources: JSONL, CSV, TFRecord, a text directory (one folder per class), tfds.

JSONL, CSV and TFRecord sources are one file, a glob pattern of shards
(`data/train-*.jsonl.gz`) or a comma-separated list; files ending in `.gz` are read
through gzip. Every file is read as a stream.

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
import glob
import gzip
import json
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import List, Optional

from tf_effitrain.errors import DataError, DataWarning

__all__ = ["Examples", "DataError", "DataWarning", "expand_paths", "load_examples",
           "read_records", "read_text_file"]


@dataclass
class Examples:
    """Texts with integer labels in `[0, len(class_names))`; `splits` names each
    example's split when the source defines it (`data.split: files` or `hash`), else
    it is None."""

    texts: List[str]
    labels: List[int]
    class_names: List[str]
    splits: Optional[List[str]] = None

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


_KIND = {"jsonl": "JSONL", "csv": "CSV", "tfrecord": "TFRecord"}


def expand_paths(path, source, key="data.path"):
    """The sorted files of `path`: one file, a glob pattern (`data/train-*.jsonl.gz`)
    or several of them separated by commas. A `DataError` when nothing matches."""
    files = []
    for part in [p.strip() for p in str(path).split(",") if p.strip()]:
        if glob.has_magic(part):
            matched = sorted(f for f in glob.glob(part) if os.path.isfile(f))
            if not matched:
                raise DataError(f"No file matches the pattern {part!r}. Check `{key}`.")
            files += matched
        else:
            _require_file(part, f"{_KIND[source]} file", source)
            files.append(part)
    if not files:
        raise DataError(f"`{key}` names no file. Received: {path!r}")
    return files


def _open(path):
    """A binary file object; `.gz` files are decompressed as they are read."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(path, what):
    """`(line number, text)` of each line of a UTF-8 (optionally gzip) file, read as a
    stream; a `DataError` with the line of a bad byte, or for a broken gzip file."""
    i = 0
    try:
        with _open(path) as f:
            # Iterating bytes splits on b"\n" only: `str.splitlines` also splits on
            # U+2028 and friends, which JSON writers leave unescaped inside strings.
            for i, raw in enumerate(f, 1):
                if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # the byte-order mark Excel writes
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x}). {what} "
                        "must be UTF-8 text: convert it, e.g. `iconv -f latin1 -t utf-8 "
                        "in > out`.") from None
                yield i, line
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: not a complete gzip file after line {i} ({e}). "
                        "Re-create it, or remove it from `data.path`.") from None


def _field(record, name, where, kind):
    if name not in record:
        raise DataError(
            f"{where}: no `{name}` {kind}. Available: {sorted(record)}. "
            f"Set `data.{'text' if kind == 'text field' else 'label'}_field`."
        )
    return record[name]


def _read_jsonl(cfg, files):
    for path in files:
        for i, line in _lines(path, "A JSONL file"):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object per line, got "
                                f"{type(record).__name__}.")
            yield (_field(record, cfg.text_field, where, "text field"),
                   _field(record, cfg.label_field, where, "label field"), where)


def _read_csv(cfg, files):
    for path in files:
        # Lines decoded one by one (with their endings, as `newline=""` would give them):
        # a bad byte is reported with its own line, and quoted fields may span lines.
        reader = csv.DictReader(line for _, line in _lines(path, "A CSV file"))
        end = 1  # the header's last line
        try:
            for record in reader:
                # A quoted field can span lines: name the record's first line.
                where = f"{path}:{end + 1}"
                end = reader.line_num
                yield (_field(record, cfg.text_field, where, "text field"),
                       _field(record, cfg.label_field, where, "label field"), where)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}).") from None


def _read_tfrecord(cfg, files):
    """`tf.train.Example` records: a bytes `text_field`, a bytes or int64
    `label_field` (plain or GZIP-compressed files, by the `.gz` suffix)."""
    import tensorflow as tf  # Only TFRecord sources pay for it.

    for path in files:
        ds = tf.data.TFRecordDataset(path, compression_type="GZIP"
                                     if path.endswith(".gz") else "")
        try:
            for i, raw in enumerate(ds.as_numpy_iterator()):
                where = f"{path} record {i}"
                try:
                    features = tf.train.Example.FromString(raw).features.feature
                except Exception:  # protobuf's DecodeError
                    raise DataError(f"{where}: not a tf.train.Example.") from None
                record = {}
                for name, feature in features.items():
                    kind = feature.WhichOneof("kind")
                    values = list(getattr(feature, kind).value) if kind else []
                    if len(values) == 1:
                        value = values[0]
                        record[name] = (value.decode("utf-8", errors="replace")
                                        if isinstance(value, bytes) else value)
                yield (_field(record, cfg.text_field, where, "text field"),
                       _field(record, cfg.label_field, where, "label field"), where)
        except tf.errors.DataLossError:
            raise DataError(f"{path}: not a (complete) TFRecord file.") from None


def _read_text_dir(cfg, files=None):
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


def _read_tfds(cfg, files=None):
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
            "tfds": _read_tfds, "tfrecord": _read_tfrecord}
FILE_SOURCES = ("jsonl", "csv", "tfrecord")


def read_records(cfg, files=None):
    """`(text, raw label, where)` of every example of the configured source, read as a
    stream. `files`: the files to read (file sources), by default all of `data.path`."""
    if cfg.source in FILE_SOURCES and files is None:
        files = expand_paths(cfg.path, cfg.source)
    return _READERS[cfg.source](cfg, files)


def split_files(cfg):
    """`{split: files}` with `data.split: files`; else `{None: files}` (None for
    sources that are not files)."""
    if cfg.split_method != "files":
        return {None: expand_paths(cfg.path, cfg.source) if cfg.source in FILE_SOURCES
                else None}
    groups = {"train": expand_paths(cfg.path, cfg.source)}
    for split, key in (("validation", "validation_path"), ("test", "test_path")):
        if getattr(cfg, key):
            groups[split] = expand_paths(getattr(cfg, key), cfg.source, f"data.{key}")
    return groups


def tagged_records(cfg, files=None, split=None):
    """`(split, text, label, where)` of every example, checked (`clean_example`); the
    split from the file group (`split`) or, with `data.split: hash`, from the text;
    None with `stratified`."""
    from tf_effitrain.data.splits import hash_split

    by_hash = cfg.split_method == "hash"
    for text, raw, where in read_records(cfg, files):
        text, label = clean_example(cfg, text, raw, where)
        tag = hash_split(text, cfg.val_fraction, cfg.test_fraction) if by_hash else split
        yield tag, text, label, where


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


def label_index(labels, classes, where_of, source_name):
    """Maps raw labels to class indices (the rules of the module docstring).

    Args:
        labels: iterable of distinct raw labels (int or str, from `_clean_label`).
        classes: list of str or None. `data.classes`.
        where_of: dict. The first place each raw label occurs (for errors).
        source_name: str. The file or dataset, for errors.

    Returns:
        `(class_names, {raw label: index})`.
    """
    labels = sorted(labels, key=lambda x: (isinstance(x, str), x))
    class_names, ints_are_indices = _class_names(labels, classes)
    if len(class_names) < 2:
        raise DataError(
            f"Need at least 2 classes to train a classifier. Found: {class_names} in "
            f"{source_name!r}. Check `data.label_field` and `data.path`."
        )
    index = {name: i for i, name in enumerate(class_names)}
    mapping = {}
    for label in labels:
        i = index.get(str(label))
        if i is None and ints_are_indices and isinstance(label, int) and (
                0 <= label < len(class_names)):
            i = label
        if i is None:
            shown = class_names[:10] + (["..."] if len(class_names) > 10 else [])
            raise DataError(
                f"{where_of[label]}: label {label!r} is out of range: not one of the "
                f"{len(class_names)} classes {shown}"
                + (f" nor an index below {len(class_names)}" if ints_are_indices else "")
                + ". Fix the data or `data.classes`."
            )
        mapping[label] = i
    if not ints_are_indices and all(isinstance(x, int) for x in labels):
        warnings.warn(
            f"Integer labels {class_names[:5]}{'...' if len(class_names) > 5 else ''} "
            f"are not the indices 0..{len(class_names) - 1}: they are used as class "
            "names. Set `data.classes` to fix names and order.", DataWarning, stacklevel=3)
    return class_names, mapping


def source_name(cfg):
    """The dataset or path, as errors name it."""
    return cfg.tfds_name if cfg.source == "tfds" else cfg.path


def clean_example(cfg, text, raw, where):
    """`(text, label)` of one record: text checked, label an int or a str."""
    text = _clean_text(text, where, cfg.text_field)
    if not text.strip():
        raise DataError(f"{where}: `{cfg.text_field}` is empty: it tokenizes to "
                        "nothing. Fix or remove the example.")
    return text, _clean_label(raw, where)


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
    texts, labels, tags, where_of = [], [], [], {}
    for split, files in split_files(cfg).items():
        for tag, text, label, where in tagged_records(cfg, files, split):
            texts.append(text)
            labels.append(label)
            tags.append(tag)
            where_of.setdefault(label, where)
    if not texts:
        raise DataError(
            f"No examples found for source {cfg.source!r} at {source_name(cfg)!r}.")
    class_names, mapping = label_index(where_of, cfg.classes, where_of, source_name(cfg))
    indices = [mapping[label] for label in labels]
    if len(set(indices)) < 2:
        raise DataError(
            f"All {len(indices)} examples are of the class {class_names[indices[0]]!r}: a "
            "classifier needs examples of at least 2 classes. Check `data.label_field`.")
    return Examples(texts=texts, labels=indices, class_names=class_names,
                    splits=None if cfg.split_method == "stratified" else tags)
