"""Build the embedded default dataset `data/fortunes/fortunes.jsonl`.

Source: Debian's `fortunes` package (fortune-mod 1.99.1 data files, BSD licence; see
data/README.md). Each fortune file is one topic category; every cookie (text between
`%` lines) becomes one labelled example. Run from the repository root:

    python data/build_fortunes.py            # downloads the .deb with apt-get (Debian registry)
    python data/build_fortunes.py --from-dir /usr/share/games/fortunes

The output is deterministic: cookies are whitespace-normalised, texts that appear in more
than one category are dropped (their label would be ambiguous), and rows are sorted.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import tempfile
from collections import Counter, defaultdict

CATEGORIES = ("computers", "politics", "men-women", "startrek", "food", "sports")
MIN_CHARS = 20
MAX_CHARS = 1200
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def read_cookies(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    for cookie in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
        # Drop control characters (terminal bells, backspace overstrikes) before joining.
        text = " ".join(_CONTROL.sub(" ", cookie).split())
        if MIN_CHARS <= len(text) <= MAX_CHARS:
            yield text


def fetch_fortunes_dir(workdir):
    subprocess.run(["apt-get", "download", "fortunes"], cwd=workdir, check=True)
    (deb,) = glob.glob(os.path.join(workdir, "fortunes_*.deb"))
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(workdir, "x")], check=True)
    return os.path.join(workdir, "x", "usr", "share", "games", "fortunes")


def build(fortune_dir, out_path):
    labels_of = defaultdict(set)
    for category in CATEGORIES:
        for text in read_cookies(os.path.join(fortune_dir, category)):
            labels_of[text].add(category)
    rows = sorted(
        (labels.pop(), text) for text, labels in labels_of.items() if len(labels) == 1
    )
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for label, text in rows:
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return Counter(label for label, _ in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-dir", help="an extracted fortunes directory")
    parser.add_argument("--out", default="data/fortunes/fortunes.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fortune_dir = args.from_dir or fetch_fortunes_dir(tmp)
        counts = build(fortune_dir, args.out)
    print(f"wrote {sum(counts.values())} examples to {args.out}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
