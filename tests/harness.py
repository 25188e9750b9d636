"""The shared test harness: engines, tiny configs, numeric comparison, fresh processes.

Plain helpers (no TensorFlow device setup: worker scripts of multi-process tests import
them after creating their strategy); the fixtures are in conftest.py.

Every new part of the toolkit adds tests, not helpers: take engines from `ENGINES`,
small configs from `tiny_config`, compare weights with `max_abs_diff`, and check that a
saved model reloads in a new process with `round_trip_in_fresh_process`.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tf_effitrain.config import load_config
from tf_effitrain.config.choices import ENGINES  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTUNES = os.path.join(REPO, "data", "fortunes", "fortunes.jsonl")

# A run small enough for a test: a few seconds on 2 cores.
TINY = [
    "data.vocab_size=300", "data.max_length=32", "data.batch_size=16",
    "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64",
    "training.epochs=2", "training.verbose=0", "runtime.precision=float32",
]


def tiny_config(data_path, run_dir, *overrides):
    """An `ExperimentConfig` for a tiny run on `data_path` written to `run_dir`."""
    return load_config(None, [f"data.path={data_path}", f"training.run_dir={run_dir}",
                              *TINY, *overrides])


def max_abs_diff(a, b):
    """Largest absolute difference between two models' (or weight lists') weights."""
    a = a.get_weights() if hasattr(a, "get_weights") else a
    b = b.get_weights() if hasattr(b, "get_weights") else b
    assert len(a) == len(b), (len(a), len(b))
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b))


def run_python(code, timeout=300, env=None):
    """Runs `code` in a fresh Python process in the repository; returns it completed."""
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=environ, capture_output=True, text=True, timeout=timeout)


def round_trip_in_fresh_process(model, inputs, tmp_path, engine="keras3", atol=1e-6):
    """Saves `model` as .keras, loads it in a new process after `import tf_effitrain`
    (as a user's script would), and checks it gives the same outputs on `inputs`."""
    path = str(tmp_path / "round_trip.keras")
    model.save(path)
    np.save(str(tmp_path / "inputs.npy"), inputs)
    np.save(str(tmp_path / "outputs.npy"), np.asarray(model(inputs)))
    module = "keras" if engine == "keras3" else "tf_keras"
    done = run_python(f"""
        import numpy as np
        import tf_effitrain
        import {module} as keras
        model = keras.models.load_model({path!r})
        got = np.asarray(model(np.load({str(tmp_path / "inputs.npy")!r})))
        want = np.load({str(tmp_path / "outputs.npy")!r})
        print(type(model).__name__, float(np.max(np.abs(got - want))))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    name, diff = done.stdout.split()[-2:]
    assert float(diff) <= atol, diff
    return name


def fortune_rows(per_class=30, classes=("computers", "politics", "startrek")):
    """A small slice of the embedded dataset: real text, a few classes."""
    rows, seen = [], {c: 0 for c in classes}
    with open(FORTUNES, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["label"] in seen and seen[r["label"]] < per_class:
                seen[r["label"]] += 1
                rows.append(r)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)
