import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs for MirroredStrategy tests; must happen before TF initialises.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTUNES = os.path.join(REPO, "data", "fortunes", "fortunes.jsonl")


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy on the two logical CPUs for the whole session.

    A second MirroredStrategy in the same process restarts the collective instance keys
    and its all-reduce collides with the first's ("Shape mismatch in the collective
    instance"); a real run makes one strategy per process.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Each test starts and ends with float32 policies in both engines."""
    import keras
    import tf_keras

    yield
    for k in (keras, tf_keras):
        k.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
    tf_keras.backend.clear_session()


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


@pytest.fixture
def small_jsonl(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fortune_rows()), encoding="utf-8")
    return str(path)

