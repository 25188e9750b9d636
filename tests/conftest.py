"""Shared fixtures (the helpers are in harness.py): one MirroredStrategy, global-state
reset, small datasets, one finished run."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Learned vocabularies are cached per user; tests keep theirs apart (fresh processes
# they start inherit it).
import tempfile  # noqa: E402

os.environ.setdefault("TF_EFFITRAIN_CACHE", tempfile.mkdtemp(prefix="tf_effitrain_cache_"))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from harness import (  # noqa: E402,F401
    ENGINES,
    FORTUNES,
    REPO,
    TINY,
    fortune_rows,
    max_abs_diff,
    round_trip_in_fresh_process,
    run_python,
    tiny_config,
    write_jsonl,
)

# Two logical CPUs for MirroredStrategy tests; must happen before TF initialises.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)


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


@pytest.fixture(scope="session")
def shared_jsonl(tmp_path_factory):
    """90 real examples (3 classes x 30), written once per session."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "small.jsonl", fortune_rows())


@pytest.fixture
def small_jsonl(shared_jsonl):
    return shared_jsonl


@pytest.fixture(scope="session")
def finished_run(shared_jsonl, tmp_path_factory):
    """One tiny Keras 3 run for the tests that only read a finished run directory.

    Read-only by convention: tests that write into a run make their own.
    """
    from tf_effitrain.training import train

    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    # max_length 128: most texts are shorter, so its rows are padded (export tests).
    config = tiny_config(shared_jsonl, run_dir, "data.max_length=128")
    result = train(config)
    return config, result
