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

__all__ = ["measure_one", "measure_in_child", "ratio", "cpu_name", "child_environment",
           "save_figure"]

_DEVICE = "CPU:0"


def cpu_name():
    """The CPU model from /proc/cpuinfo, its family and vector extensions (benchmarks
    print where they ran: e.g. "AMD EPYC (family 26, 2 cores, avx512_bf16, avx512_vnni)"
    or "AMD EPYC (family 25, 2 cores, AVX2, no AVX-512)")."""
    from tf_effitrain.runtime.info import cpu_flags

    name, family = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
                if line.startswith("cpu family"):  # tells CPU generations apart
                    family = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = set(cpu_flags())
    wide = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    vector = ", ".join(wide) if wide else (
        "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{name} (" + (f"family {family}, " if family else "") + f"{cores} cores"
            + (f", {vector})" if vector else ")"))


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
                seed=0, precision="float32", jit_compile="auto", steps_per_execution=1,
                feed="train_on_batch", wrap=False, profile=0):
    """Trains `steps + 1` updates of one configuration in this process; returns a row.

    Meant for a fresh process (see the module docstring): `measure_in_child` runs it
    in one.

    Args:
        jit_compile: bool or `"auto"`. Passed to `compile` (`"auto"`, Keras' default,
            means no XLA on a CPU-only machine).
        steps_per_execution: int. Passed to `compile`; above 1 it needs `feed="fit"`
            (`train_on_batch` runs one step per call whatever this is).
        feed: str. `"train_on_batch"` (one call per update, the inputs are numpy
            arrays) or `"fit"` (`fit` over an in-memory repeated `tf.data` dataset:
            the trainer's own loop; the clock runs from the end of the first
            execution to the end of the last, so tracing and epoch set-up are
            excluded). `"fit"` times `steps` rounded up to a multiple of
            `steps_per_execution`; the row's `timed_steps` says how many.
        wrap: bool. Train through the gradient accumulator even at `k=1` (the
            trainer's own step) instead of the plain model's `train_step`.
        profile: int. After timing, trace this many more steps with the profiler and
            add their time per op type to the row (`profile`; see `bench.profile`).
    """
    if feed not in ("train_on_batch", "fit"):
        raise ValueError(f"`feed` must be 'train_on_batch' or 'fit'. Received: {feed!r}")
    if steps_per_execution > 1 and feed != "fit":
        raise ValueError("`steps_per_execution` > 1 needs `feed='fit'`: train_on_batch "
                         "runs one step per call.")
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
    trainable = accumulate(model, k) if k > 1 or wrap else model
    optimizer = keras.optimizers.AdamW(1e-4)
    optimizer.build(trainable.trainable_variables)
    # Only non-default options are passed, so a default row is compiled as before.
    options = {}
    if jit_compile != "auto":
        options["jit_compile"] = jit_compile
    if steps_per_execution != 1:
        options["steps_per_execution"] = steps_per_execution
    trainable.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      **options)
    rng = np.random.RandomState(seed)
    x = rng.randint(1, vocab_size, size=(batch * k, max_length)).astype("int32")
    y = rng.randint(0, 6, size=(batch * k,)).astype("int32")
    stats = _allocator_stats()
    base = stats("current") if stats else 0
    rss_base = _rss_peak_mb()
    timed_steps = steps
    if feed == "fit":
        seconds, timed_steps = _time_fit(trainable, keras, x, y, steps, steps_per_execution)
    else:
        trainable.train_on_batch(x, y)  # traces the step
        start = time.perf_counter()
        for _ in range(steps):
            trainable.train_on_batch(x, y)
        seconds = (time.perf_counter() - start) / steps
    rss_growth = _rss_peak_mb() - rss_base
    step_peak = (stats("peak") - base) / 2**20 if stats else rss_growth
    extra = {}
    if profile:
        from tf_effitrain.bench.profile import profile_steps

        extra["profile"] = profile_steps(lambda: trainable.train_on_batch(x, y), profile)
    return {
        "micro_batch": batch, "accumulation_steps": k, "effective_batch": batch * k,
        "precision": precision,
        "step_peak_mb": step_peak, "rss_growth_mb": rss_growth,
        "memory_source": "allocator" if stats else "rss",
        "ms_per_update": 1000 * seconds, "examples_per_s": batch * k / seconds,
        **({} if feed == "train_on_batch" and jit_compile == "auto" else {
            "feed": feed, "jit_compile": jit_compile,
            "steps_per_execution": steps_per_execution, "timed_steps": timed_steps}),
        **extra,
    }


def _time_fit(model, keras, x, y, steps, steps_per_execution):
    """Seconds per update of `model.fit` over an in-memory dataset, and the steps timed.

    The first execution (tracing, iterator start) runs before the clock starts: the
    clock reads the end of every execution from `on_train_batch_end`, which Keras
    calls once per `steps_per_execution` steps, after the step function returned.
    """
    import tensorflow as tf

    executions = -(-steps // steps_per_execution)  # timed executions, rounded up
    marks = []

    class _Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            marks.append(time.perf_counter())

    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, steps_per_epoch=(executions + 1) * steps_per_execution, epochs=1,
              verbose=0, callbacks=[_Clock()])
    timed = executions * steps_per_execution
    return (marks[-1] - marks[0]) / timed, timed


def measure_in_child(env=None, **kwargs):
    """`measure_one(**kwargs)` in a fresh Python process; returns its row.

    Args:
        env: dict or None. Extra environment variables of the child (e.g.
            `TF_NUM_INTRAOP_THREADS`, `TF_ENABLE_ONEDNN_OPTS`: TensorFlow reads them
            once, at start-up, so they need a fresh process).
        **kwargs: `measure_one`'s arguments.
    """
    if dataclasses.is_dataclass(kwargs["model_cfg"]):
        kwargs["model_cfg"] = dataclasses.asdict(kwargs["model_cfg"])
    done = subprocess.run(
        [sys.executable, "-m", "tf_effitrain.bench._measure", json.dumps(kwargs)],
        capture_output=True, text=True, check=False,
        env={**child_environment(), **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_figure(fig, path, title=None):
    """Lays out, writes (PNG, 110 dpi) and closes a matplotlib figure; returns `path`."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratio(a, b):
    """`a / b`, or NaN when `b` is 0 (a tiny model can fit in the first pool region)."""
    return a / b if b > 0 else float("nan")


if __name__ == "__main__":
    print(json.dumps(measure_one(**json.loads(sys.argv[1]))))
