"""`tf-effitrain bench accumulation`: peak memory and speed of gradient accumulation.

Three configurations of the same model: micro-batch b with k=1, micro-batch b with k
(k times the batch), and batch k*b with k=1 (the batch accumulation stands in for),
each in a fresh process (see `_measure`). Speed and memory only, no accuracy claim.
"""

from tf_effitrain.bench._measure import cpu_name, measure_in_child, ratio, save_figure

__all__ = ["bench_accumulation", "format_accumulation", "run_suite", "format_result",
           "plot_result"]

# `--quick`: a tiny model and few steps (checks the suite, not the figures).
QUICK_MODEL = {"num_layers": 1, "d_model": 32, "num_heads": 2, "ffn_dim": 64}


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
        row = measure_in_child(model_cfg=model_cfg, vocab_size=vocab_size,
                                max_length=max_length, batch=batch, k=steps_k, steps=steps,
                                engine=engine, seed=seed)
        rows.append(row)
        if log:
            log(f"  b={batch:<4} k={steps_k:<2} step memory {row['step_peak_mb']:8.1f} MB  "
                f"(RSS +{row['rss_growth_mb']:.0f} MB)  {row['ms_per_update']:8.1f} "
                f"ms/update  {row['examples_per_s']:7.1f} ex/s")
    small, accumulated, large = rows
    ratios = {
        "step_peak_k_vs_k1": ratio(accumulated["step_peak_mb"], small["step_peak_mb"]),
        "step_peak_large_batch_vs_k1": ratio(large["step_peak_mb"], small["step_peak_mb"]),
        "step_peak_k_vs_large_batch": ratio(accumulated["step_peak_mb"],
                                             large["step_peak_mb"]),
        "throughput_k_vs_k1": ratio(accumulated["examples_per_s"], small["examples_per_s"]),
        "throughput_k_vs_large_batch": ratio(accumulated["examples_per_s"],
                                              large["examples_per_s"]),
    }
    return {"rows": rows, "ratios": ratios, "k": k, "engine": engine, "cpu": cpu_name(),
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
        f"CPU: {result['cpu']}; step memory from "
        f"{', '.join(sorted({r.get('memory_source', 'allocator') for r in result['rows']}))}.",
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



def run_suite(config, args, log=print):
    """The `bench accumulation` suite (see `tf_effitrain.bench.suite`)."""
    import dataclasses

    quick = bool(getattr(args, "quick", False))
    model_cfg, length = config.model, config.data.max_length
    micro, k, steps = args.micro_batch, args.accumulation_steps, args.steps
    if quick:
        model_cfg = dataclasses.replace(model_cfg, **QUICK_MODEL, embedding_rank=None,
                                        layer_heads=None, layer_ffn_dims=None, low_rank=[])
        length, micro, k, steps = min(length, 32), 4, 3, 2
    if log:
        log(f"bench accumulation: {model_cfg.num_layers} layer(s), d_model "
            f"{model_cfg.d_model}, sequence {length}, micro-batch {micro}, k={k}, {steps} "
            "timed updates each" + (" (quick)" if quick else ""))
    result = bench_accumulation(model_cfg, vocab_size=config.data.vocab_size,
                                max_length=length, micro_batch=micro, k=k, steps=steps,
                                engine=config.runtime.engine, seed=config.runtime.seed,
                                log=log)
    result["quick"] = quick
    return result


format_result = format_accumulation


def plot_result(result, path):
    """A PNG: step memory and examples/s of the three configurations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"b={r['micro_batch']}, k={r['accumulation_steps']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, title in ((axes[0], "step_peak_mb", "step memory (MB)"),
                           (axes[1], "examples_per_s", "examples / s")):
        ax.bar(range(len(rows)), [r[key] for r in rows],
               color=["tab:gray", "tab:blue", "tab:orange"])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, f"Gradient accumulation, {result['cpu']}")
