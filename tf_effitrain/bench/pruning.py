"""`tf-effitrain bench pruning`: tfmot pruning (50%, 80%, 2:4) and quantization-aware
training against the float model, over seeds; file sizes; the wrappers' step overhead.

For each seed (its own splits): train the base model (reused when a finished run of
the same config exists), then `tf-effitrain compress` it at each level and read the
compressed run's `compression.json`. File sizes: the int8 file of each QAT level,
gzipped (zeros compress; the raw flatbuffer does not shrink), against the base model's
raw float32 TFLite file. Overhead: training steps of the same tf_keras
model with and without pruning wrappers, interleaved in one process.
"""

import dataclasses
import json
import os
import time

import numpy as np

from tf_effitrain.bench._measure import cpu_name

__all__ = ["PRUNING_LEVELS", "bench_pruning", "format_pruning", "plot_pruning",
           "pruning_overhead", "run_suite", "format_result", "plot_result"]

PRUNING_LEVELS = {
    "prune 50%": {"pruning": {"target_sparsity": 0.5}},
    "prune 80%": {"pruning": {"target_sparsity": 0.8}},
    "prune 2:4": {"pruning": {"m_by_n": [2, 4]}},
    "qat int8": {"qat": True},
    # The token embedding is most of a small model's weights: pruned here too, for
    # the file-size figure.
    "prune 80% + embedding + qat int8": {"pruning": {"target_sparsity": 0.8,
                                                     "embedding": True}, "qat": True},
}


def _with(comp, changes, fine_tune_epochs, run_dir):
    pruning = dataclasses.replace(comp.pruning, **changes.get("pruning", {}))
    return dataclasses.replace(comp, pruning=pruning, qat=changes.get("qat", False),
                               fine_tune_epochs=fine_tune_epochs, run_dir=run_dir,
                               tflite_latency=False)


def _float_file(run_dir, config):
    """The base run's model as a float32 TFLite file: `(bytes, gzipped bytes)`."""
    from tf_effitrain.engine import get_keras
    from tf_effitrain.export.tflite import export_tflite, gzipped_size

    path = os.path.join(run_dir, "bench_float32.tflite")
    if not os.path.exists(path):
        model = get_keras(config.runtime.engine).models.load_model(
            os.path.join(run_dir, "model.keras"), compile=False)
        export_tflite(model, path, "none", sequence_length=config.data.max_length)
    return os.path.getsize(path), gzipped_size(path)


def pruning_overhead(model_cfg, vocab_size=4000, max_length=128, batch=32, steps=20,
                     rounds=3, seed=0):
    """Seconds per training step of one tf_keras model with and without tfmot pruning
    wrappers (accumulator k=1, as `tf-effitrain` trains), interleaved over `rounds`.

    Returns:
        dict: median seconds per step of each, and their ratio.
    """
    import tf_keras

    from tf_effitrain.compress.pruning import prune
    from tf_effitrain.models import build_transformer_classifier
    from tf_effitrain.training.accumulation import accumulate

    tf_keras.utils.set_random_seed(seed)
    rng = np.random.RandomState(seed)
    x = rng.randint(1, vocab_size, size=(batch, max_length)).astype("int32")
    x[:, max_length // 2:] = 0
    y = rng.randint(0, 4, size=batch).astype("int32")
    models = {}
    for name in ("plain", "pruned"):
        model = build_transformer_classifier(model_cfg, vocab_size, 4, max_length,
                                             keras=tf_keras)
        if name == "pruned":
            model, _ = prune(model, 0.8, "polynomial", 0, 10_000, frequency=10)
        trainable = accumulate(model, 1)
        trainable.compile(optimizer=tf_keras.optimizers.Adam(1e-4),
                          loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trainable.train_on_batch(x, y)  # trace
        models[name] = trainable
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, trainable in models.items():
            for _ in range(steps):
                start = time.perf_counter()
                trainable.train_on_batch(x, y)
                times[name].append(time.perf_counter() - start)
    result = {name: float(np.median(t)) for name, t in times.items()}
    result["ratio"] = result["pruned"] / result["plain"]
    return result


def bench_pruning(config, seeds=(0, 1, 2), levels=None, fine_tune_epochs=3,
                  run_root="runs/bench_pruning", overhead=True, log=print):
    """Trains a base model per seed and prunes / quantizes it at each level.

    Args:
        config: `ExperimentConfig` of the base model (its `compression:` is replaced).
        seeds: sequence of int.
        levels: dict name -> `{"pruning": {...}, "qat": bool}` (default
            `PRUNING_LEVELS`).
        fine_tune_epochs: int. Pruning fine-tuning epochs (QAT: `compression.qat_epochs`).
        run_root: str. Runs go to `run_root/seed<N>/<level>`.
        overhead: bool. Also time the pruning wrappers' step overhead.
        log: callable.

    Returns:
        dict with per-level, per-seed rows, their summaries, file sizes and the CPU.
    """
    from tf_effitrain.bench.compress import base_run
    from tf_effitrain.compress.run import COMPRESSION_FILE, compress_run
    from tf_effitrain.training.report import last_test_accuracy

    levels = levels or PRUNING_LEVELS
    rows = {name: [] for name in levels}
    base_acc, float_files = [], []
    for seed in seeds:
        base_dir, base_cfg = base_run(config, seed, run_root, log)
        base_acc.append(last_test_accuracy(base_dir))
        float_files.append(_float_file(base_dir, base_cfg))
        log(f"seed {seed} base test accuracy {base_acc[-1]:.4f}; float32 TFLite "
            f"{float_files[-1][0]:,} bytes ({float_files[-1][1]:,} gzipped)")
        for name, changes in levels.items():
            out = os.path.join(run_root, f"seed{seed}", name.replace(" ", "_").replace(
                "%", "pct").replace("+", "and").replace(":", "-"))
            comp = _with(base_cfg.compression, changes, fine_tune_epochs, out)
            start = time.perf_counter()
            compress_run(base_dir, dataclasses.replace(base_cfg, compression=comp),
                         log=lambda line: None, overwrite=True)
            with open(os.path.join(out, COMPRESSION_FILE), encoding="utf-8") as f:
                s = json.load(f)
            row = {"seed": seed, "accuracy": s["after"]["accuracy"],
                   "base_accuracy": s["before"]["accuracy"],
                   "seconds": time.perf_counter() - start}
            table = s.get("sparsity") or []
            if table:
                row["sparsity"] = sum(r["zeros"] for r in table) / sum(r["size"] for r in table)
                row["max_sparsity_error"] = max(
                    abs(r["zeros"] - r["size"] * s["compression"]["pruning"]["target_sparsity"])
                    for r in table) if not s["compression"]["pruning"]["m_by_n"] else None
            if "int8" in s:
                row["int8_accuracy"] = s["int8"].get("tflite_accuracy")
                row["int8_gzip_bytes"] = s["int8"]["gzip_bytes"]
                row["int8_vs_float32_gzip"] = s["int8"]["gzip_bytes"] / float_files[-1][0]
            row["retained"] = row["accuracy"] / row["base_accuracy"]
            if row.get("int8_accuracy") is not None:
                row["int8_retained"] = row["int8_accuracy"] / row["base_accuracy"]
            rows[name].append(row)
            log(f"seed {seed} {name:22s} accuracy {row['accuracy']:.4f} "
                f"({row['retained']:.1%} of base)"
                + (f", int8 file {row['int8_accuracy']:.4f}" if "int8_accuracy" in row else "")
                + (f", sparsity {row['sparsity']:.1%}" if "sparsity" in row else ""))

    def stat(values):
        values = [v for v in values if v is not None]
        return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None

    summary = {name: {key: stat([r.get(key) for r in rows[name]])
                      for key in ("accuracy", "retained", "sparsity", "int8_accuracy",
                                  "int8_retained", "int8_gzip_bytes", "int8_vs_float32_gzip",
                                  "seconds")}
               for name in levels}
    result = {"cpu": cpu_name(), "seeds": list(seeds), "fine_tune_epochs": fine_tune_epochs,
              "base_accuracy": {"mean": float(np.mean(base_acc)), "std": float(np.std(base_acc)),
                                "per_seed": base_acc},
              "float32_tflite": {"bytes": float_files[0][0],
                                 "gzip_bytes": float_files[0][1]},
              "rows": rows, "summary": summary}
    if overhead:
        result["overhead"] = pruning_overhead(config.model, max_length=config.data.max_length,
                                              batch=config.data.batch_size)
        log(f"pruning wrappers: {result['overhead']['ratio']:.2f}x the step time")
    return result


def _ms(s, pct=False):
    if s is None:
        return "-"
    if pct:
        return f"{s['mean']:.1%} ± {s['std']:.1%}"
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def format_pruning(result):
    """The bench result as a Markdown table."""
    b = result["base_accuracy"]
    f = result["float32_tflite"]
    lines = [f"CPU: {result['cpu']}; seeds {result['seeds']}; pruning fine-tunes "
             f"{result['fine_tune_epochs']} epochs, QAT 1 epoch", "",
             f"float32 base model: test accuracy {b['mean']:.4f} ± {b['std']:.4f}; float32 "
             f"TFLite file {f['bytes']:,} bytes ({f['gzip_bytes']:,} gzipped)", "",
             "| level | test accuracy (Keras) | kept of float | sparsity | int8 file accuracy "
             "| int8 kept of float | int8 file gzipped | vs float32 file |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        gz, ratio = s["int8_gzip_bytes"], s["int8_vs_float32_gzip"]
        sparsity = f"{s['sparsity']['mean']:.1%}" if s["sparsity"] else "-"
        size = f"{gz['mean'] / 1024:.0f} KB | {ratio['mean']:.3f}x" if gz else "- | -"
        lines.append(f"| {name} | {_ms(s['accuracy'])} | {_ms(s['retained'], True)} | "
                     f"{sparsity} | {_ms(s['int8_accuracy'])} | "
                     f"{_ms(s['int8_retained'], True)} | {size} |")
    lines.append("")
    if "overhead" in result:
        o = result["overhead"]
        lines.append(f"Pruning wrappers' training-step overhead (same model, batch "
                     f"interleaved): {o['plain'] * 1000:.1f} ms plain vs "
                     f"{o['pruned'] * 1000:.1f} ms wrapped = {o['ratio']:.2f}x.")
    lines.append("'vs float32 file': the gzipped int8 file against the raw float32 TFLite "
                 "file of the base model.")
    return "\n".join(lines)


def plot_pruning(result, path):
    """Test accuracy per level (mean ± std), the float model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, ax = plt.subplots(figsize=(8, 4))
    means = [result["summary"][n]["accuracy"]["mean"] for n in names]
    stds = [result["summary"][n]["accuracy"]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue",
           label="Keras model")
    int8 = [(i, result["summary"][n]["int8_accuracy"]) for i, n in enumerate(names)
            if result["summary"][n]["int8_accuracy"]]
    if int8:
        ax.errorbar([i for i, _ in int8], [s["mean"] for _, s in int8],
                    yerr=[s["std"] for _, s in int8], fmt="o", color="tab:red",
                    label="int8 TFLite file")
    base = result["base_accuracy"]
    ax.axhline(base["mean"], color="k", linestyle="--", label="float32 base")
    ax.axhline(0.99 * base["mean"], color="gray", linestyle=":", label="99% of base")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_ylim(max(0.0, min(means) - 0.1), min(1.0, max(means) + 0.05))
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_suite(config, args, log=print):
    """The `bench pruning` suite (see `bench.compress.run_levels_suite`); `--quick`
    skips the wrappers' overhead timing."""
    from tf_effitrain.bench.compress import run_levels_suite

    return run_levels_suite("pruning", bench_pruning, PRUNING_LEVELS, PRUNING_LEVELS,
                            "prune 50%", config, args, log,
                            overhead=not getattr(args, "quick", False))


format_result = format_pruning
plot_result = plot_pruning
