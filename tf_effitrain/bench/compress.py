"""`tf-effitrain bench compress`: accuracy vs latency of structured compression levels.

For each seed (its own splits): train the base model, then compress it at each level
(`tf-effitrain compress` with fine-tuning) and read each compressed run's
`compression.json` (parameters, FLOPs, batch-1 / batch-32 latency measured beside the
base model in the same process, accuracy before and after). Reports the mean and spread
over seeds and draws accuracy against latency.
"""

import dataclasses
import json
import os

import numpy as np

from tf_effitrain.bench._measure import cpu_name

__all__ = ["LEVELS", "EXTRA_LEVELS", "bench_compress", "format_compress", "plot_compress",
           "run_suite", "format_result", "plot_result"]

# name -> compression overrides (fractions removed; low-rank as a share of full rank).
LEVELS = {
    "heads+ffn 25%": {"structured": {"heads_fraction": 0.25, "neurons_fraction": 0.25}},
    "heads+ffn 50%": {"structured": {"heads_fraction": 0.5, "neurons_fraction": 0.5}},
    "heads+ffn 75%": {"structured": {"heads_fraction": 0.75, "neurons_fraction": 0.75}},
    "ffn rank 1/2": {"low_rank": {"layers": ["*_ffn_*"], "rank_fraction": 0.5}},
}
# Variants of the same compression (`bench compress --levels ...`).
EXTRA_LEVELS = {
    "heads+ffn 50% distilled": {"structured": {"heads_fraction": 0.5,
                                               "neurons_fraction": 0.5}, "distill": True},
    "heads+ffn 50% gradual": {"structured": {"heads_fraction": 0.5, "neurons_fraction": 0.5,
                                             "iterations": 3}},
    "ffn rank 1/2 distilled": {"low_rank": {"layers": ["*_ffn_*"], "rank_fraction": 0.5},
                               "distill": True},
}


def _with(comp, changes, fine_tune_epochs, run_dir):
    structured = dataclasses.replace(comp.structured, **changes.get("structured", {}))
    low_rank = dataclasses.replace(comp.low_rank, **changes.get("low_rank", {}))
    return dataclasses.replace(comp, structured=structured, low_rank=low_rank,
                               fine_tune_epochs=fine_tune_epochs, run_dir=run_dir,
                               distill=changes.get("distill", False))


def _finished_with(run_dir, config):
    """Whether `run_dir` holds a finished run of exactly `config` (reused, not retrained)."""
    from tf_effitrain.config import ConfigError, load_config
    from tf_effitrain.training.rundir import run_status

    path = os.path.join(run_dir, "config.yaml")
    if run_status(run_dir) != "finished" or not os.path.isfile(path):
        return False
    try:
        return load_config(path).to_dict() == config.to_dict()
    except ConfigError:
        return False


def base_run(config, seed, run_root, log=print):
    """The base model of one seed, trained into `run_root/seed<N>/base` unless a finished
    run of the same config is there. Returns `(run_dir, config)`."""
    from tf_effitrain.training import train

    base_dir = os.path.join(run_root, f"seed{seed}", "base")
    base_cfg = dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, seed=seed),
        training=dataclasses.replace(config.training, run_dir=base_dir, verbose=0),
        compression=type(config.compression)())
    if _finished_with(base_dir, base_cfg):
        log(f"seed {seed} base: reusing the finished run {base_dir}")
    else:
        train(base_cfg, overwrite=True)
    return base_dir, base_cfg


def bench_compress(config, seeds=(0, 1, 2), levels=None, fine_tune_epochs=3,
                   run_root="runs/bench_compress", log=print):
    """Trains a base model per seed and compresses it at each level.

    Args:
        config: `ExperimentConfig` of the base model (its `compression:` is replaced).
        seeds: sequence of int.
        levels: dict name -> compression overrides (default `LEVELS`).
        fine_tune_epochs: int. Fine-tuning epochs of each compressed model.
        run_root: str. Runs go to `run_root/seed<N>/<level>`.
        log: callable.

    Returns:
        dict with per-level, per-seed rows and their summaries, and the CPU.
    """
    from tf_effitrain.compress.run import COMPRESSION_FILE, compress_run

    levels = levels or LEVELS
    rows = {name: [] for name in levels}
    base_acc = []
    for seed in seeds:
        from tf_effitrain.training.report import last_test_accuracy

        base_dir, base_cfg = base_run(config, seed, run_root, log)
        base_acc.append(last_test_accuracy(base_dir))
        log(f"seed {seed} base test accuracy {base_acc[-1]:.4f}")
        for name, changes in levels.items():
            out = os.path.join(run_root, f"seed{seed}", name.replace(" ", "_").replace("/", "-")
                               .replace("%", "pct").replace("+", "_"))
            comp = _with(base_cfg.compression, changes, fine_tune_epochs, out)
            compress_run(base_dir, dataclasses.replace(base_cfg, compression=comp),
                         log=lambda line: None, overwrite=True)
            with open(os.path.join(out, COMPRESSION_FILE), encoding="utf-8") as f:
                s = json.load(f)
            lat = s["latency_ms"]
            row = {"seed": seed, "accuracy": s["after"]["accuracy"],
                   "base_accuracy": s["before"]["accuracy"],
                   "params": s["after"]["params"] / s["before"]["params"],
                   "flops": s["after"]["flops"] / s["before"]["flops"],
                   "latency_1": lat["after"]["1"] / lat["before"]["1"],
                   "latency_32": lat["after"]["32"] / lat["before"]["32"],
                   "tflite_1": (lat["after"]["tflite_1"] / lat["before"]["tflite_1"]
                                if "tflite_1" in lat["after"] else float("nan")),
                   "latency_ms": lat}
            row["retained"] = row["accuracy"] / row["base_accuracy"]
            rows[name].append(row)
            log(f"seed {seed} {name:14s} accuracy {row['accuracy']:.4f} "
                f"({row['retained']:.1%} of base), params {row['params']:.2f}x, "
                f"latency b1 {row['latency_1']:.2f}x b32 {row['latency_32']:.2f}x")

    def stat(name, key):
        values = [r[key] for r in rows[name]]
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    summary = {name: {key: stat(name, key) for key in
                      ("accuracy", "retained", "params", "flops", "latency_1", "latency_32",
                       "tflite_1")}
               for name in levels}
    return {"cpu": cpu_name(), "seeds": list(seeds), "fine_tune_epochs": fine_tune_epochs,
            "base_accuracy": {"mean": float(np.mean(base_acc)), "std": float(np.std(base_acc)),
                              "per_seed": base_acc},
            "rows": rows, "summary": summary}


def format_compress(result):
    """The bench result as a Markdown table."""
    b = result["base_accuracy"]
    lines = [f"CPU: {result['cpu']}; seeds {result['seeds']}; fine-tuning "
             f"{result['fine_tune_epochs']} epochs per level", "",
             f"base model: test accuracy {b['mean']:.4f} ± {b['std']:.4f}", "",
             "| level | test accuracy | kept of base | params | FLOPs | Keras batch-1 | "
             "Keras batch-32 | TFLite batch-1 |", "|---|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        lines.append(
            f"| {name} | {s['accuracy']['mean']:.4f} ± {s['accuracy']['std']:.4f} | "
            f"{s['retained']['mean']:.1%} ± {s['retained']['std']:.1%} | "
            f"{s['params']['mean']:.2f}x | {s['flops']['mean']:.2f}x | "
            f"{s['latency_1']['mean']:.2f}x ± {s['latency_1']['std']:.2f} | "
            f"{s['latency_32']['mean']:.2f}x ± {s['latency_32']['std']:.2f} | "
            f"{s['tflite_1']['mean']:.2f}x ± {s['tflite_1']['std']:.2f} |")
    lines.append("")
    lines.append("Ratios are against the base model of the same seed, measured in the same "
                 "process (latency: median of interleaved calls, padded length = "
                 "data.max_length).")
    return "\n".join(lines)


def plot_compress(result, path):
    """Accuracy against batch-1 and batch-32 latency ratio, one point per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    base = result["base_accuracy"]["mean"]
    for ax, key, title in ((axes[0], "latency_1", "Keras, batch 1"),
                           (axes[1], "latency_32", "Keras, batch 32"),
                           (axes[2], "tflite_1", "TFLite float32, batch 1")):
        ax.errorbar([1.0], [base], yerr=[result["base_accuracy"]["std"]], fmt="ks",
                    label="base")
        for name, s in result["summary"].items():
            ax.errorbar([s[key]["mean"]], [s["accuracy"]["mean"]], xerr=[s[key]["std"]],
                        yerr=[s["accuracy"]["std"]], fmt="o", label=name)
        ax.set_xlabel(f"CPU latency vs base ({title})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_levels_suite(name, bench, known, default, quick_level, config, args, log,
                     **kwargs):
    """`bench compress` / `bench pruning` (see `tf_effitrain.bench.suite`): a base run
    per seed compressed at `--levels` (default `default`), `--seeds`,
    `--fine-tune-epochs`; `--quick`: `quick_level` of a tiny model, one seed."""
    from tf_effitrain.bench.distill import QUICK
    from tf_effitrain.config import ConfigError, load_config

    quick = bool(getattr(args, "quick", False))
    if quick:
        config = load_config(getattr(args, "config", None) or "configs/demo_cpu.yaml",
                             [*(getattr(args, "overrides", None) or []), *QUICK])
        names = [quick_level]
    else:
        levels = getattr(args, "levels", None)
        names = [n.strip() for n in levels.split(",")] if levels else list(default)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"Unknown --levels {unknown}. Known: {list(known)}")
    seeds = tuple(range(1 if quick else args.seeds))
    epochs = 1 if quick else args.fine_tune_epochs
    if log:
        log(f"bench {name}: levels {names}, seeds {list(seeds)}, {epochs} fine-tuning "
            "epoch(s)" + (" (quick)" if quick else ""))
    result = bench(config, seeds=seeds, levels={n: known[n] for n in names},
                   fine_tune_epochs=epochs, run_root=args.run_root,
                   log=log, **kwargs)
    result.update(suite=name, quick=quick)
    return result


def run_suite(config, args, log=print):
    """The `bench compress` suite (see `run_levels_suite`)."""
    return run_levels_suite("compress", bench_compress, {**LEVELS, **EXTRA_LEVELS}, LEVELS,
                            "heads+ffn 50%", config, args, log)


format_result = format_compress
plot_result = plot_compress
