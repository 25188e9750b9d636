"""`tf-effitrain bench accumulation`: peak memory and speed of gradient accumulation.

Three configurations of the same model: micro-batch b with k=1, micro-batch b with k
(k times the batch), and batch k*b with k=1 (the batch accumulation stands in for).
Each runs in a fresh process, because TensorFlow's CPU allocator keeps its pool: the
"step memory" is how far the pool (`tf.config.experimental.get_memory_info`) grows from
just before the first training step (model and optimizer state built) to the end,
i.e. the training step's working set at the allocator's granularity; the growth of
the process's peak RSS is reported beside it. Speed is measured over the updates after
the first (which traces the step). Inputs are random token ids at the full
`max_length` (the worst case for activations): speed and memory only, no accuracy.
"""

import dataclasses
import json
import resource
import subprocess
import sys
import time

__all__ = ["bench_accumulation", "format_accumulation", "measure_one"]

_DEVICE = "CPU:0"


def _rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_one(model_cfg, vocab_size, max_length, batch, k, steps, engine="keras3",
                seed=0):
    """Trains `steps + 1` updates of one configuration in this process; returns a row.

    Meant for a fresh process (see the module docstring); `bench_accumulation` runs it
    in one per configuration.
    """
    import numpy as np
    import tensorflow as tf

    from tf_effitrain.config import ModelConfig
    from tf_effitrain.engine import get_keras
    from tf_effitrain.models import build_transformer_classifier
    from tf_effitrain.training.accumulation import accumulate

    keras = get_keras(engine)
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
    tf.config.experimental.reset_memory_stats(_DEVICE)
    base = tf.config.experimental.get_memory_info(_DEVICE)["current"]
    rss_base = _rss_peak_mb()
    trainable.train_on_batch(x, y)  # traces the step
    start = time.perf_counter()
    for _ in range(steps):
        trainable.train_on_batch(x, y)
    seconds = (time.perf_counter() - start) / steps
    peak = tf.config.experimental.get_memory_info(_DEVICE)["peak"]
    return {
        "micro_batch": batch, "accumulation_steps": k, "effective_batch": batch * k,
        "step_peak_mb": (peak - base) / 2**20, "rss_growth_mb": _rss_peak_mb() - rss_base,
        "ms_per_update": 1000 * seconds, "examples_per_s": batch * k / seconds,
    }


def _measure_in_child(**kwargs):
    kwargs["model_cfg"] = dataclasses.asdict(kwargs["model_cfg"])
    done = subprocess.run(
        [sys.executable, "-m", "tf_effitrain.bench.accumulation", json.dumps(kwargs)],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if b > 0 else float("nan")


def bench_accumulation(model_cfg, vocab_size=4000, max_length=128, micro_batch=32, k=8,
                       steps=5, engine="keras3", seed=0, log=print):
    """Measures (b, 1), (b, k) and (k*b, 1) for one model in one process.

    Args:
        model_cfg: `ModelConfig`.
        vocab_size: int. Vocabulary of the random inputs.
        max_length: int. Sequence length of every input.
        micro_batch: int. `b`.
        k: int. Accumulation steps.
        steps: int. Timed updates per configuration (after one warm-up update).
        engine: str. `"keras3"` or `"tf_keras"`.
        seed: int.
        log: callable or None. Receives one progress line per configuration.

    Returns:
        dict: `rows` (one dict per configuration) and `ratios`.
    """
    rows = []
    for batch, steps_k in ((micro_batch, 1), (micro_batch, k), (micro_batch * k, 1)):
        row = _measure_in_child(model_cfg=model_cfg, vocab_size=vocab_size,
                                max_length=max_length, batch=batch, k=steps_k, steps=steps,
                                engine=engine, seed=seed)
        rows.append(row)
        if log:
            log(f"  b={batch:<4} k={steps_k:<2} step memory {row['step_peak_mb']:8.1f} MB  "
                f"(RSS +{row['rss_growth_mb']:.0f} MB)  {row['ms_per_update']:8.1f} "
                f"ms/update  {row['examples_per_s']:7.1f} ex/s")
    small, accumulated, large = rows
    ratios = {
        "step_peak_k_vs_k1": _ratio(accumulated["step_peak_mb"], small["step_peak_mb"]),
        "step_peak_large_batch_vs_k1": _ratio(large["step_peak_mb"], small["step_peak_mb"]),
        "step_peak_k_vs_large_batch": _ratio(accumulated["step_peak_mb"],
                                             large["step_peak_mb"]),
        "throughput_k_vs_k1": _ratio(accumulated["examples_per_s"], small["examples_per_s"]),
        "throughput_k_vs_large_batch": _ratio(accumulated["examples_per_s"],
                                              large["examples_per_s"]),
    }
    return {"rows": rows, "ratios": ratios, "k": k, "engine": engine,
            "max_length": max_length}


def format_accumulation(result):
    """A Markdown table and the ratios of `bench_accumulation`'s result."""
    k = result["k"]
    lines = [
        "| micro-batch | k | effective batch | step memory (MB) | peak RSS growth (MB) "
        "| ms / update | examples / s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['micro_batch']} | {r['accumulation_steps']} | "
                     f"{r['effective_batch']} | {r['step_peak_mb']:.1f} | "
                     f"{r['rss_growth_mb']:.0f} | {r['ms_per_update']:.1f} | "
                     f"{r['examples_per_s']:.1f} |")
    q = result["ratios"]
    lines += [
        "",
        f"- step memory, k={k} vs k=1 (same micro-batch): "
        f"**{q['step_peak_k_vs_k1']:.2f}x**",
        f"- step memory, batch {k}b vs b: **{q['step_peak_large_batch_vs_k1']:.2f}x**; "
        f"k={k} needs **{q['step_peak_k_vs_large_batch']:.2f}x** of the {k}b batch's",
        f"- throughput (examples/s), k={k} vs k=1 at the same micro-batch: "
        f"**{q['throughput_k_vs_k1']:.2f}x**; vs the {k}b batch: "
        f"**{q['throughput_k_vs_large_batch']:.2f}x**",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure_one(**json.loads(sys.argv[1]))))
