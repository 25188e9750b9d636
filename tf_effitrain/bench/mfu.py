"""`tf-effitrain bench mfu`: model FLOPs utilization against this machine's matmul peak.

In one run:

1. **Peak**: large square matmuls (`tf.matmul` of two n x n matrices, float32 and
   bfloat16, the best of several calls) at the start and again at the end; the higher
   figure of each dtype is the peak (the lower the MFU, the more conservative).
2. **Model FLOPs**: counted analytically for the real shapes of a training batch
   (`training_flops`): every Dense / low-rank kernel per token, attention scores and
   weighted values over the keys each token attends to, the logits; training = 3 x
   forward (the backward pass computes two matmuls per forward one). Embedding lookups,
   normalization, softmax and the optimizer are not counted: they are the waste MFU
   shows.
3. **Step time**: the trainer's own step (the gradient accumulator, k=1, AdamW) under
   `model.fit` on random full-length rows (no padding: every computed token is real),
   each model and precision in a fresh process, the first execution excluded.

MFU = model FLOPs per second / peak. Reported against the peak of the step's own dtype
and against the bfloat16 peak (the machine's best).
"""

import dataclasses
import time

import numpy as np

from tf_effitrain.bench._measure import cpu_name, measure_in_child, save_figure

__all__ = ["matmul_peak", "training_flops", "bench_mfu", "run_suite", "format_result",
           "plot_result", "LARGE_MODEL"]

# The d_model >= 256 model: configs/colab_tpu.yaml's encoder; and a wider one, to show
# how utilization grows with the matmuls' size.
LARGE_MODEL = {"num_layers": 6, "d_model": 256, "num_heads": 8, "ffn_dim": 1024}
WIDE_MODEL = {"num_layers": 4, "d_model": 512, "num_heads": 8, "ffn_dim": 2048}
QUICK_MODEL = {"num_layers": 1, "d_model": 64, "num_heads": 2, "ffn_dim": 128}
POLICIES = ("float32", "mixed_bfloat16")


def matmul_peak(dtype="float32", n=2048, calls=5):
    """Best GFLOP/s of an `n x n @ n x n` matmul in `dtype` over `calls` timed calls."""
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_normal([n, n], seed=[0, 1]), dtype)
    b = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)[:1, :1]))
    matmul(a, b).numpy()  # trace and warm up
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def training_flops(model, model_cfg, lengths):
    """Training FLOPs (3 x forward) of a batch of examples of the given token counts.

    Args:
        model: the built classifier (its kernels give the per-token matmul sizes).
        model_cfg: `ModelConfig`.
        lengths: sequence of int. Real tokens of each example in the batch.
    """
    from tf_effitrain.compress.structured import analytic_flops

    per_length = {}
    total = 0
    for n in lengths:
        n = int(n)
        if n not in per_length:
            per_length[n] = analytic_flops(model, model_cfg, n)
        total += per_length[n]
    return 3 * total


def _step_flops(model_cfg, vocab_size, num_classes, length, batch):
    from tf_effitrain.config import ModelConfig
    from tf_effitrain.models import build_transformer_classifier

    cfg = ModelConfig(**model_cfg) if isinstance(model_cfg, dict) else model_cfg
    model = build_transformer_classifier(cfg, vocab_size, num_classes, length)
    return training_flops(model, cfg, [length] * batch), int(model.count_params())


def bench_mfu(models, vocab_size=4000, max_length=128, batch=32, steps=10,
              policies=POLICIES, n=2048, profile_model=None, log=print):
    """Peaks, then each model's step under each policy; MFU per row.

    Args:
        models: dict of name -> `ModelConfig` (or its dict).
        vocab_size: int.
        max_length: int. Tokens per row (all real).
        batch: int. Rows per step.
        steps: int. Timed steps per configuration.
        policies: sequence of str. Dtype policies.
        n: int. Matmul size of the peak measurement.
        profile_model: str or None. The model whose step under the last policy is
            profiled (None: the last model).
        log: callable or None.

    Returns:
        dict (JSON): `peak_gflops` (per dtype; `peak_measurements`: each), `rows`,
        `profile` (`profile_model` under the last policy: op time per step by op
        type, from three traced steps), `cpu`.
    """
    log = log or (lambda line: None)
    peaks = {"float32": [], "bfloat16": []}

    def measure_peaks():
        for dtype in peaks:
            peaks[dtype].append(matmul_peak(dtype, n))
        log("  matmul peak: " + ", ".join(f"{d} {v[-1]:.0f} GFLOP/s" for d, v in peaks.items()))

    measure_peaks()
    rows, profile = [], None
    profiled = (profile_model or list(models)[-1], policies[-1])
    for name, cfg in models.items():
        cfg = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        flops, params = _step_flops(cfg, vocab_size, 6, max_length, batch)
        for policy in policies:
            row = measure_in_child(model_cfg=cfg, vocab_size=vocab_size,
                                   max_length=max_length, batch=batch, k=1, steps=steps,
                                   precision=policy, feed="fit", wrap=True,
                                   profile=3 if (name, policy) == profiled else 0)
            if "profile" in row:
                profile = {"model": name, "precision": policy, "ops": row["profile"]}
            seconds = row["ms_per_update"] / 1000
            rows.append({"model": name, "config": cfg, "params": params,
                         "precision": policy, "batch": batch, "length": max_length,
                         "ms_per_step": row["ms_per_update"], "flops_per_step": flops,
                         "gflops_per_s": flops / seconds / 1e9,
                         "tokens_per_s": batch * max_length / seconds})
            log(f"  {name:8s} {policy:15s} {row['ms_per_update']:8.1f} ms/step  "
                f"{rows[-1]['gflops_per_s']:6.1f} GFLOP/s")
    measure_peaks()
    peak = {d: max(v) for d, v in peaks.items()}
    for row in rows:
        own = peak["bfloat16" if "bfloat16" in row["precision"] else "float32"]
        row["mfu_own_dtype"] = row["gflops_per_s"] / own
        row["mfu_vs_bf16_peak"] = row["gflops_per_s"] / peak["bfloat16"]
    return {"suite": "mfu", "cpu": cpu_name(), "peak_gflops": peak,
            "peak_measurements": peaks, "matmul_n": n, "rows": rows, "steps": steps,
            "profile": profile}


def run_suite(config, args, log=print):
    """The `bench mfu` suite: the config's model, the d_model 256 model of
    configs/colab_tpu.yaml and a d_model 512 one (quick: a tiny model and small
    matmuls). The profile is of the d_model 256 model under mixed_bfloat16."""
    quick = bool(getattr(args, "quick", False))
    if quick:
        models = {"quick": QUICK_MODEL}
        kwargs = dict(vocab_size=500, max_length=32, batch=8, steps=3, n=512)
    else:
        plain = {"layer_heads": None, "layer_ffn_dims": None, "low_rank": [],
                 "embedding_rank": None}
        models = {"config": config.model,
                  "d_model 256": {**dataclasses.asdict(config.model), **LARGE_MODEL, **plain},
                  "d_model 512": {**dataclasses.asdict(config.model), **WIDE_MODEL, **plain}}
        kwargs = dict(vocab_size=config.data.vocab_size, max_length=config.data.max_length,
                      batch=getattr(args, "micro_batch", None) or 32,
                      steps=getattr(args, "steps", None) or 10, profile_model="d_model 256")
    if log:
        log(f"bench mfu: models {list(models)}, batch {kwargs['batch']} x "
            f"{kwargs['max_length']} tokens" + (" (quick)" if quick else ""))
    result = bench_mfu(models, log=log, **kwargs)
    result["quick"] = quick
    return result


def format_result(result):
    """A Markdown table of `bench_mfu`'s result."""
    peak = result["peak_gflops"]
    lines = ["| model | parameters | precision | ms / step | model GFLOP/s | MFU (own dtype "
             "peak) | MFU (bf16 peak) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r["config"]
        lines.append(
            f"| {r['model']} ({c['num_layers']} x d_model {c['d_model']}) | "
            f"{r['params']:,} | {r['precision']} | {r['ms_per_step']:.1f} | "
            f"{r['gflops_per_s']:.1f} | {r['mfu_own_dtype']:.1%} | "
            f"**{r['mfu_vs_bf16_peak']:.1%}** |")
    first = result["rows"][0]
    lines += ["", f"Peak (best of {result['matmul_n']}^3 matmuls, measured before and after "
              f"the steps): float32 {peak['float32']:.0f} GFLOP/s, bfloat16 "
              f"{peak['bfloat16']:.0f} GFLOP/s. Steps: batch {first['batch']} x "
              f"{first['length']} real tokens, the trainer's step (AdamW), "
              f"{result['steps']} timed. CPU: {result['cpu']}."
              + (" Quick run (tiny model): not the config's figures."
                 if result.get("quick") else "")]
    profile = result.get("profile")
    if profile:
        from tf_effitrain.bench.profile import MATMUL_OPS

        ops = profile["ops"]
        total = sum(o["ms_per_step"] for o in ops)
        matmul = sum(o["ms_per_step"] for o in ops if o["op"] in MATMUL_OPS)
        lines += ["", f"Where the step's time goes ({profile['model']}, "
                  f"{profile['precision']}; op time summed over TensorFlow's compute "
                  f"threads, {total:.0f} ms per step, {matmul / max(total, 1e-9):.0%} in "
                  "matmuls):", "", "| op | ms / step | calls / step | share |",
                  "|---|---|---|---|"]
        for o in ops[:12]:
            lines.append(f"| {o['op']} | {o['ms_per_step']:.1f} | "
                         f"{o['calls_per_step']:.0f} | {o['share']:.1%} |")
    return "\n".join(lines)


def plot_result(result, path):
    """A PNG: achieved model GFLOP/s per row against the two peaks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model']}\n{r['precision']}" for r in rows]
    bars = ax.bar(range(len(rows)), [r["gflops_per_s"] for r in rows],
                  color=["tab:orange" if "bfloat16" in r["precision"] else "tab:blue"
                         for r in rows])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['mfu_vs_bf16_peak']:.0%}", (bar.get_x() + bar.get_width() / 2,
                                                     bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    for dtype, style in (("float32", "--"), ("bfloat16", ":")):
        ax.axhline(result["peak_gflops"][dtype], linestyle=style, color="gray")
        ax.annotate(f"{dtype} matmul peak", (len(rows) - 0.5, result["peak_gflops"][dtype]),
                    ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("model GFLOP/s (training)")
    ax.set_title(f"MFU (label: vs bf16 peak), {result['cpu']}", fontsize=10)
    return save_figure(fig, path)
