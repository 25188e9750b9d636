"""The run report: `report.md` with a results table, per-class figures, the confusion
matrix and training curves as PNG."""

import json
import os

from tf_effitrain.training.callbacks import METRICS_FILE

__all__ = ["read_metrics", "last_test_accuracy", "plot_curves", "write_report"]


def read_metrics(path):
    """All records of a `metrics.jsonl` file."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def last_test_accuracy(run_dir):
    """A run's test accuracy: its last `test` record in metrics.jsonl, or None."""
    tests = [r for r in read_metrics(os.path.join(run_dir, METRICS_FILE))
             if r.get("split") == "test" and "accuracy" in r]
    return tests[-1]["accuracy"] if tests else None


def plot_curves(epochs, path):
    """Loss and accuracy per epoch (train and validation) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")  # No display on servers and CI.
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["epoch"] for r in epochs]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            key = prefix + metric
            if any(key in r for r in epochs):
                ax.plot(x, [r.get(key) for r in epochs], style,
                        label="validation" if prefix else "train")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _kept(summary):
    best, run = summary.get("best_epoch"), summary.get("epochs_run")
    monitor = summary["config"]["training"].get("best_metric", "val_accuracy")
    if best is None:
        return f"last epoch ({run})" if run else "last epoch"
    return f"epoch {best} of {run} (best `{monitor}`)"


def write_report(run_dir, summary):
    """Writes `report.md` and `curves.png` into `run_dir` from `metrics.jsonl`.

    Args:
        run_dir: str.
        summary: dict with `config`, `params`, `split_sizes`, `class_names`,
            `majority_baseline`, `test` (dict of metrics), `wall_time_s`; optional
            `test_details` (`per_class`, `confusion`, `weighted_f1`: a per-class table
            and `confusion.png`), `best_epoch`, `epochs_run`, `precision`, `strategy`, and `extra_lines`
            (Markdown lines that plugins add at the end).

    Returns:
        The report path.
    """
    records = read_metrics(os.path.join(run_dir, METRICS_FILE))
    epochs = [r for r in records if r.get("split") == "train"]
    if epochs:
        plot_curves(epochs, os.path.join(run_dir, "curves.png"))
    cfg = summary["config"]
    m = cfg["model"]
    lines = [
        f"# Run report: {os.path.basename(os.path.abspath(run_dir))}",
        "",
        "## Result",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    test = summary.get("test") or {}
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("loss", "loss")):
        if key in test:
            lines.append(f"| test {label} | {test[key]:.4f} |")
    if summary.get("majority_baseline") is not None:
        lines.append(f"| majority-class baseline (test) | {summary['majority_baseline']:.4f} |")
    lines += [
        f"| weights kept | {_kept(summary)} |",
        f"| wall time | {summary.get('wall_time_s', 0):.1f} s |",
        f"| parameters (trainable / total) | {summary['params']['trainable']:,} / "
        f"{summary['params']['total']:,} |",
    ]
    details = summary.get("test_details")
    if details:
        from tf_effitrain.training.metrics import per_class_table, plot_confusion_matrix

        plot_confusion_matrix(details["confusion"], summary["class_names"],
                              os.path.join(run_dir, "confusion.png"))
        worst = min(details["per_class"], key=lambda row: row["recall"])
        lines += ["", "## Per class (test)", "",
                  f"Lowest recall: `{worst['class']}` ({worst['recall']:.4f}); "
                  f"support-weighted F1 {details['weighted_f1']:.4f}.", "",
                  *per_class_table(details), "", "![confusion matrix](confusion.png)"]
    lines += [
        "",
        "## Setup",
        "",
        f"- engine `{cfg['runtime']['engine']}`, precision "
        f"`{summary.get('precision', cfg['runtime']['precision'])}`, strategy "
        f"`{summary.get('strategy', cfg['runtime']['strategy'])}`",
        f"- data `{cfg['data']['source']}` "
        f"`{cfg['data']['tfds_name'] or cfg['data']['path']}`: splits "
        + ", ".join(f"{k} {v}" for k, v in summary["split_sizes"].items())
        + f"; classes {', '.join(summary['class_names'])}",
        f"- model `{m['kind']}`: {m['num_layers']} layers, d_model {m['d_model']}, "
        f"{m['num_heads']} heads, ffn {m['ffn_dim']}, norm {m['norm']} ({m['norm_position']}),"
        f" attention {m['attention']}, share_layers {m['share_layers']}, shared_kv "
        f"{m['shared_kv']}, embedding_rank {m['embedding_rank']}"
        + (f"; heads per layer {m['layer_heads']}" if m.get("layer_heads") else "")
        + (f"; FFN width per layer {m['layer_ffn_dims']}" if m.get("layer_ffn_dims") else "")
        + (f"; low-rank {', '.join(m['low_rank'])}" if m.get("low_rank") else ""),
        f"- optimizer `{cfg['optimizer']['name']}` lr {cfg['optimizer']['learning_rate']}, "
        f"schedule `{cfg['schedule']['name']}`, {cfg['training']['epochs']} epochs",
        "",
        "## Training curves",
        "",
        "![curves](curves.png)" if epochs else "(no epochs recorded)",
        "",
        "| epoch | loss | accuracy | val_loss | val_accuracy | val_macro_f1 | learning rate |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in epochs:
        lines.append(
            f"| {r['epoch']} | {fmt(r.get('loss'))} | {fmt(r.get('accuracy'))} | "
            f"{fmt(r.get('val_loss'))} | {fmt(r.get('val_accuracy'))} | "
            f"{fmt(r.get('val_macro_f1'))} | {r.get('learning_rate', 0):.2e} |"
        )
    if summary.get("extra_lines"):
        lines += [""] + list(summary["extra_lines"])
    path = os.path.join(run_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
