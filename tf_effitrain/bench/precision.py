"""`tf-effitrain bench precision`: training speed per dtype policy, in one run.

The same model and batch trained under float32, mixed_bfloat16 and mixed_float16, each in
a fresh process (the dtype policy is process state; see `_measure`), with the ratios
to float32 and what `precision: auto` picks on this machine. Speed only: the
numerical agreement of the policies is tested in tests/, not claimed here.
"""

from tf_effitrain.bench._measure import cpu_name, measure_in_child, ratio

__all__ = ["POLICIES", "bench_precision", "format_precision"]

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
            "auto": choose_precision("auto", detect_hardware()), "engine": engine, "cpu": cpu_name(),
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
