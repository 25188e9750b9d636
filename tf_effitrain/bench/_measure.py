"""Measure one training configuration in a fresh process (shared by the benchmarks).

TensorFlow's CPU allocator keeps its pool for the life of a process, and the global
dtype policy is process state: each configuration therefore runs in its own process.
"Step memory" is how far the allocator pool (`tf.config.experimental.get_memory_info`)
grows from just before the first training step (model and optimizer state built) to the
end: the step's working set at the allocator's granularity. The growth of the process's
peak RSS is reported beside it.

TensorFlow keeps CPU allocator statistics only with oneDNN on (its default on CPUs with
AVX-512 BF16/VNNI) or with the BFC CPU allocator. The child process is therefore started
with `TF_CPU_ALLOCATOR_USE_BFC=true`, so the same figure exists on every x86 CPU (and
every configuration uses the same allocator); if statistics are still unavailable, step
memory falls back to peak RSS growth and the row says so (`memory_source`). Speed is measured over the updates after the first
(which traces the step). Inputs are random token ids at the full `max_length`.
"""

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time

__all__ = ["measure_one", "measure_in_child", "ratio", "cpu_name", "child_environment"]

_DEVICE = "CPU:0"


def cpu_name():
    """The CPU model from /proc/cpuinfo (benchmarks print where they ran)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child_environment(environ=None):
    """The environment of a measuring child process: allocator statistics on."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _allocator_stats():
    """`(reset, read)` functions for the CPU allocator, or None when unavailable."""
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats(_DEVICE)
    except ValueError:  # "Cannot reset memory stats": no allocator statistics here
        return None
    return lambda key: tf.config.experimental.get_memory_info(_DEVICE)[key]


def _rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_one(model_cfg, vocab_size, max_length, batch, k, steps, engine="keras3",
                seed=0, precision="float32"):
    """Trains `steps + 1` updates of one configuration in this process; returns a row.

    Meant for a fresh process (see the module docstring): `measure_in_child` runs it
    in one.
    """
    import numpy as np
    import tensorflow as tf

    from tf_effitrain.config import ModelConfig
    from tf_effitrain.engine import get_keras
    from tf_effitrain.models import build_transformer_classifier
    from tf_effitrain.training.accumulation import accumulate

    keras = get_keras(engine)
    keras.mixed_precision.set_global_policy(precision)
    if isinstance(model_cfg, dict):
        model_cfg = ModelConfig(**model_cfg)
    keras.utils.set_random_seed(seed)
    model = build_transformer_classifier(model_cfg, vocab_size, 6, max_length, keras=keras)
    trainable = accumulate(model, k) if k > 1 else model
    optimizer = keras.optimizers.AdamW(1e-4)
    optimizer.build(trainable.trainable_variables)
    trainable.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(seed)
    x = rng.randint(1, vocab_size, size=(batch * k, max_length)).astype("int32")
    y = rng.randint(0, 6, size=(batch * k,)).astype("int32")
    stats = _allocator_stats()
    base = stats("current") if stats else 0
    rss_base = _rss_peak_mb()
    trainable.train_on_batch(x, y)  # traces the step
    start = time.perf_counter()
    for _ in range(steps):
        trainable.train_on_batch(x, y)
    seconds = (time.perf_counter() - start) / steps
    rss_growth = _rss_peak_mb() - rss_base
    step_peak = (stats("peak") - base) / 2**20 if stats else rss_growth
    return {
        "micro_batch": batch, "accumulation_steps": k, "effective_batch": batch * k,
        "precision": precision,
        "step_peak_mb": step_peak, "rss_growth_mb": rss_growth,
        "memory_source": "allocator" if stats else "rss",
        "ms_per_update": 1000 * seconds, "examples_per_s": batch * k / seconds,
    }


def measure_in_child(**kwargs):
    """`measure_one(**kwargs)` in a fresh Python process; returns its row."""
    kwargs["model_cfg"] = dataclasses.asdict(kwargs["model_cfg"])
    done = subprocess.run(
        [sys.executable, "-m", "tf_effitrain.bench._measure", json.dumps(kwargs)],
        capture_output=True, text=True, check=False, env=child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a, b):
    """`a / b`, or NaN when `b` is 0 (a tiny model can fit in the first pool region)."""
    return a / b if b > 0 else float("nan")


if __name__ == "__main__":
    print(json.dumps(measure_one(**json.loads(sys.argv[1]))))
