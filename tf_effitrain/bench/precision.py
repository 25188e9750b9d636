"""`tf-effitrain bench precision`: training speed per dtype policy, in one run.

The same model and batch trained under float32, mixed_bfloat16 and mixed_float16, each in
a fresh process (the dtype policy is process state; see `_measure`), with the ratios
to float32 and what `precision: auto` picks on this machine. Speed only: the
numerical agreement of the policies is tested in tests/, not claimed here.
"""

from tf_effitrain.bench._measure import cpu_name, measure_in_child, ratio, save_figure

__all__ = ["POLICIES", "bench_precision", "format_precision", "run_suite", "format_result",
           "plot_result"]

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def bench_precision(model_cfg, vocab_size=4000, max_length=128, batch=32, steps=5,
                    engine="keras3", seed=0, policies=POLICIES, log=print):
    """Measures training speed (and step memory) of one model under each policy.

    Args:
        model_cfg: `ModelConfig`.
        vocab_size: int. Vocabulary of the random inputs.
        max_length: int. Sequence length of every input.
        batch: int. Batch size.
        steps: int. Timed updates per policy (after one update that traces the step).
        engine: str. `"keras3"` or `"tf_keras"`.
        seed: int.
        policies: sequence of str. Dtype policies; the first is the reference.
        log: callable or None. Receives one progress line per policy.

    Returns:
        dict: `rows`, `speedup` (examples/s relative to the first policy), `auto`
        (the policy `precision: auto` picks here, with the reason).
    """
    from tf_effitrain.runtime.hardware import detect_hardware
    from tf_effitrain.runtime.precision import choose_precision

    rows = []
    for policy in policies:
        row = measure_in_child(model_cfg=model_cfg, vocab_size=vocab_size,
                               max_length=max_length, batch=batch, k=1, steps=steps,
                               engine=engine, seed=seed, precision=policy)
        rows.append(row)
        if log:
            log(f"  {policy:<15} {row['ms_per_update']:8.1f} ms/step  "
                f"{row['examples_per_s']:7.1f} ex/s  step memory {row['step_peak_mb']:.0f} MB")
    reference = rows[0]["examples_per_s"]
    speedup = {r["precision"]: ratio(r["examples_per_s"], reference) for r in rows}
    return {"rows": rows, "speedup": speedup, "reference": policies[0],
            "auto": choose_precision("auto", detect_hardware(), model_cfg), "engine": engine,
            "cpu": cpu_name(),
            "batch": batch, "max_length": max_length}


def format_precision(result):
    """A Markdown table of `bench_precision`'s result."""
    lines = ["| policy | ms / step | examples / s | speed vs "
             f"{result['reference']} | step memory (MB) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['ms_per_update']:.1f} | "
                     f"{r['examples_per_s']:.1f} | "
                     f"**{result['speedup'][r['precision']]:.2f}x** | "
                     f"{r['step_peak_mb']:.0f} |")
    policy, reason = result["auto"]
    lines += ["", f"`precision: auto` picks **{policy}** here ({reason}). CPU: "
              f"{result['cpu']}."]
    return "\n".join(lines)


def run_suite(config, args, log=print):
    """The `bench precision` suite (see `tf_effitrain.bench.suite`)."""
    import dataclasses

    from tf_effitrain.bench.accumulation import QUICK_MODEL

    quick = bool(getattr(args, "quick", False))
    model_cfg, length, batch, steps = (config.model, config.data.max_length,
                                       args.micro_batch, args.steps)
    if quick:
        model_cfg = dataclasses.replace(model_cfg, **QUICK_MODEL, embedding_rank=None,
                                        layer_heads=None, layer_ffn_dims=None, low_rank=[])
        length, batch, steps = min(length, 32), 4, 2
    if log:
        log(f"bench precision: {model_cfg.num_layers} layer(s), d_model {model_cfg.d_model}, "
            f"sequence {length}, batch {batch}, {steps} timed steps per policy"
            + (" (quick)" if quick else ""))
    result = bench_precision(model_cfg, vocab_size=config.data.vocab_size,
                             max_length=length, batch=batch, steps=steps,
                             engine=config.runtime.engine, seed=config.runtime.seed, log=log)
    result.update(quick=quick, model=dataclasses.asdict(model_cfg))
    return result


format_result = format_precision


def plot_result(result, path):
    """A PNG: training speed of each policy relative to the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    speed = [result["speedup"][r["precision"]] for r in rows]
    bars = ax.bar(range(len(rows)), speed, color="tab:blue")
    for bar, value in zip(bars, speed):
        ax.annotate(f"{value:.2f}x", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["precision"] for r in rows], fontsize=8)
    ax.set_ylabel(f"examples / s vs {result['reference']}")
    ax.set_title(f"Training speed per precision, {result['cpu']}", fontsize=10)
    return save_figure(fig, path)
