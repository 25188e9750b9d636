"""`tf-effitrain bench distill`: teacher vs distilled student vs the student from scratch.

For each seed (each seed has its own splits, so its own teacher): train the teacher,
then the student with distillation (teacher logits computed once) and without. For the
first seed also the student with the teacher run live on every batch, which prices the
precomputation. Accuracies are reported as the mean and spread over seeds; per-epoch
times as medians of epochs 2.. (the first includes tracing); batch-1 latencies of the
saved Keras models are measured in this process, round-robin.
"""

import dataclasses
import os
import statistics

import numpy as np

from tf_effitrain.bench._measure import cpu_name, save_figure
from tf_effitrain.training.report import last_test_accuracy, read_metrics

__all__ = ["compare_runs", "bench_distill", "format_distill", "run_suite", "format_result",
           "plot_result", "QUICK"]

# `--quick`: tiny models on a few hundred examples, one seed (checks the suite, not the
# figures).
QUICK = ["data.max_examples=300", "data.vocab_size=400", "data.max_length=32",
         "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64",
         "model.embedding_rank=null", "training.epochs=1", "training.verbose=0"]



def _records(run_dir):
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def _epoch_seconds(run_dir):
    times = [r["epoch_seconds"] for r in _records(run_dir)
             if r.get("split") == "train" and "epoch_seconds" in r]
    return statistics.median(times[1:] or times) if times else None


def _logit_seconds(run_dir):
    found = [r["seconds"] for r in _records(run_dir) if r.get("split") == "teacher_logits"]
    return found[-1] if found else None


def compare_runs(run_dirs, timed=100, rounds=3):
    """Test accuracy, parameters and batch-1 latency of finished runs' saved models.

    Latency: each model is called on single padded test rows (length `data.max_length`
    of the first run) through a traced function; `rounds` rounds visit the models in
    turn, so machine noise hits them alike; the median of all calls is reported.

    Args:
        run_dirs: dict of name -> run directory.
        timed: int. Test rows timed per model and round.
        rounds: int.

    Returns:
        dict of name -> `{"accuracy", "params", "latency_ms"}`.
    """
    from tf_effitrain.config import load_config
    from tf_effitrain.data.pipeline import prepare_data, unpacked
    from tf_effitrain.engine import get_keras
    from tf_effitrain.export.run_export import _rows_and_labels
    from tf_effitrain.bench.latency import keras_latencies

    models, rows = {}, None
    for name, run_dir in run_dirs.items():
        config = load_config(os.path.join(run_dir, "config.yaml"))
        keras = get_keras(config.runtime.engine)
        models[name] = keras.models.load_model(os.path.join(run_dir, "model.keras"),
                                               compile=False)
        if rows is None:
            data = prepare_data(unpacked(dataclasses.replace(config.data, token_shuffle=0.0)),
                                config.runtime.seed, run_dir)
            rows, _ = _rows_and_labels(data.test or data.validation or data.train,
                                       config.data.max_length)
            rows = rows[:timed]
    latency = keras_latencies(models, rows, batch_sizes=(1,), timed=len(rows),
                              rounds=rounds, warmup=5)
    return {name: {"accuracy": last_test_accuracy(run_dirs[name]),
                   "params": int(models[name].count_params()),
                   "latency_ms": latency[name][1]}
            for name in models}


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def bench_distill(teacher_config, student_config, seeds=(0, 1, 2), run_root="runs/bench_distill",
                  live=True, log=print):
    """Trains teacher, distilled student and scratch student for each seed; compares.

    Args:
        teacher_config: `ExperimentConfig` of the teacher.
        student_config: `ExperimentConfig` with the student's `model:` and
            `distillation:` sections (its `distillation.teacher` is replaced).
        seeds: sequence of int. `runtime.seed` of each repetition (splits, init, order).
        run_root: str. Run directories go to `run_root/seed<N>/<role>`.
        live: bool. Also train the first seed's student with the live teacher.
        log: callable. One line per finished run.

    Returns:
        dict: per-seed accuracies, their mean and spread, epoch times, teacher-logit
        time, params and latencies, the CPU.
    """
    from tf_effitrain.training import train

    def run(config, role, seed, **distillation):
        run_dir = os.path.join(run_root, f"seed{seed}", role)
        config = dataclasses.replace(
            config,
            runtime=dataclasses.replace(config.runtime, seed=seed),
            training=dataclasses.replace(config.training, run_dir=run_dir, verbose=0),
            distillation=dataclasses.replace(config.distillation, **distillation))
        result = train(config, overwrite=True)
        log(f"seed {seed} {role:9s} test accuracy {result.test['accuracy']:.4f} "
            f"({result.wall_time_s:.0f} s)")
        return run_dir

    per_seed = []
    for seed in seeds:
        teacher = run(teacher_config, "teacher", seed, teacher="")
        dirs = {"teacher": teacher,
                "distilled": run(student_config, "distilled", seed, teacher=teacher,
                                 precompute_teacher=None),
                "scratch": run(student_config, "scratch", seed, teacher="")}
        if live and seed == seeds[0]:
            dirs["live"] = run(student_config, "live", seed, teacher=teacher,
                               precompute_teacher=False)
        per_seed.append(dirs)

    first = per_seed[0]
    compared = compare_runs({k: first[k] for k in ("teacher", "distilled", "scratch")})
    accuracy = {role: [last_test_accuracy(d[role]) for d in per_seed]
                for role in ("teacher", "distilled", "scratch")}
    summary = {role: dict(zip(("mean", "std"), _mean_spread(values)))
               for role, values in accuracy.items()}
    ratios = [d / t for d, t in zip(accuracy["distilled"], accuracy["teacher"])]
    return {
        "cpu": cpu_name(),
        "seeds": list(seeds),
        "accuracy": accuracy,
        "summary": summary,
        "distilled_over_teacher": dict(zip(("mean", "std"), _mean_spread(ratios))),
        "distilled_minus_scratch": dict(zip(("mean", "std"), _mean_spread(
            [d - s for d, s in zip(accuracy["distilled"], accuracy["scratch"])]))),
        "epoch_seconds": {role: _epoch_seconds(first[role]) for role in first},
        "teacher_logit_seconds": _logit_seconds(first["distilled"]),
        "models": compared,
        "run_dirs": per_seed,
    }


def format_distill(result):
    """The bench result as a Markdown table and summary lines."""
    s, models = result["summary"], result["models"]
    names = {"teacher": "teacher", "distilled": "student, distilled",
             "scratch": "student, from scratch"}
    lines = [f"CPU: {result['cpu']}; seeds {result['seeds']}", "",
             "| model | test accuracy (mean ± std) | per seed | parameters | batch-1 ms |",
             "|---|---|---|---|---|"]
    for role, label in names.items():
        m = models[role]
        per = ", ".join(f"{a:.4f}" for a in result["accuracy"][role])
        lines.append(f"| {label} | {s[role]['mean']:.4f} ± {s[role]['std']:.4f} | {per} | "
                     f"{m['params']:,} ({m['params'] / models['teacher']['params']:.2f}x) | "
                     f"{m['latency_ms']:.2f} ({m['latency_ms'] / models['teacher']['latency_ms']:.2f}x) |")
    ratio, gain = result["distilled_over_teacher"], result["distilled_minus_scratch"]
    epochs = result["epoch_seconds"]
    lines += ["",
              f"distilled / teacher accuracy: {ratio['mean']:.1%} ± {ratio['std']:.1%}; "
              f"distilled - scratch: {gain['mean']:+.4f} ± {gain['std']:.4f}", "",
              "seconds per epoch (median of epochs 2.., seed "
              f"{result['seeds'][0]}): " + ", ".join(
                  f"{role} {t:.2f}" for role, t in epochs.items() if t is not None)]
    if result.get("teacher_logit_seconds") is not None:
        lines.append(f"teacher logits for the training split, once: "
                     f"{result['teacher_logit_seconds']:.2f} s")
    return "\n".join(lines)


def run_suite(config, args, log=print):
    """The `bench distill` suite (see `tf_effitrain.bench.suite`): the teacher from
    `--teacher-config`, the student from `--config` (default configs/distill_demo.yaml);
    `--set` applies to both."""
    from tf_effitrain.config import load_config

    quick = bool(getattr(args, "quick", False))
    overrides = list(getattr(args, "overrides", []) or []) + (QUICK if quick else [])
    teacher_path = getattr(args, "teacher_config", None) or "configs/demo_cpu.yaml"
    student_path = getattr(args, "config", None) or "configs/distill_demo.yaml"
    teacher = load_config(teacher_path, overrides)
    student = load_config(student_path, overrides + (["model.d_model=16", "model.ffn_dim=32"]
                                                     if quick else []))
    seeds = tuple(range(1 if quick else args.seeds))
    if log:
        log(f"bench distill: teacher {teacher_path}, student {student_path}, seeds "
            f"{list(seeds)}" + (" (quick)" if quick else ""))
    result = bench_distill(teacher, student, seeds=seeds,
                           run_root=args.run_root, live=not quick,
                           log=log)
    result.update(suite="distill", quick=quick)
    return result


format_result = format_distill


def plot_result(result, path):
    """A PNG: test accuracy (mean, spread over seeds) of teacher and students."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = ("teacher", "distilled", "scratch")
    s = result["summary"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(range(3), [s[r]["mean"] for r in roles], yerr=[s[r]["std"] for r in roles],
           color=["tab:gray", "tab:blue", "tab:orange"], capsize=4)
    for i, role in enumerate(roles):
        ax.scatter([i] * len(result["accuracy"][role]), result["accuracy"][role],
                   color="black", s=10, zorder=3)
    ax.set_xticks(range(3))
    ax.set_xticklabels(["teacher", "student, distilled", "student, scratch"], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Distillation, seeds {result['seeds']}, {result['cpu']}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
