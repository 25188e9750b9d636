"""`tf-effitrain bench data`: how the input side scales with the number of examples.

For each corpus size (10K, 100K, 1M examples: the embedded corpus replicated with light
perturbation, written as JSONL), a fresh process runs `tf_effitrain.train` on the
config (by default `configs/demo_cpu.yaml`, vocabulary cache off so the vocabulary is
learned) and measures:

- **time to first step**: from the process's start (before TensorFlow is imported, as
  `tf-effitrain train` starts) to the end of the first training batch;
- **peak RSS** at the first step and after the measurements;
- **input throughput**: examples/s and real (non-padding) tokens/s of the training
  batches with the model removed (iterating `data.train` as `fit` gets it, after the
  first pass), against the tokens/s the training steps consume (steps 2..N of the same
  run): the ratio says whether the input can keep up.

Each size runs in two modes: `memory` (the corpus read into memory, split stratified,
tokenized and counted before training) and `stream` (`data.stream: true`: one checking
pass, then the files are streamed; see `tf_effitrain.data.stream`). It also times the
two vocabulary learners on the same samples (`data.vocab_learner`).
The run is stopped after its measured steps (its directory stays unfinished).
"""

import json
import os
import random
import subprocess
import sys
import time

_START = time.perf_counter()  # the child's clock starts before TensorFlow loads

__all__ = ["MODES", "make_corpus", "bench_data", "run_suite", "format_result", "plot_result"]

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 5_000)
QUICK = ["data.vocab_size=600", "model.num_layers=1", "model.d_model=32",
         "model.num_heads=2", "model.ffn_dim=64"]


def make_corpus(size, path, seed=0, source=None):
    """Writes `size` JSONL examples: the embedded corpus's, drawn with replacement, each
    lightly perturbed (one word dropped, two neighbours swapped) so texts repeat rarely.

    Returns:
        `path`.
    """
    from tf_effitrain.config import DataConfig
    from tf_effitrain.data.sources import load_examples

    examples = load_examples(DataConfig(path=source) if source else DataConfig())
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        for _ in range(size):
            i = rng.randrange(len(examples))
            words = examples.texts[i].split()
            if len(words) > 3:
                del words[rng.randrange(len(words))]
                j = rng.randrange(len(words) - 1)
                words[j], words[j + 1] = words[j + 1], words[j]
            f.write(json.dumps({"text": " ".join(words),
                                "label": examples.class_names[examples.labels[i]]}) + "\n")
    os.replace(partial, path)
    return path


class _Stop(Exception):
    """Ends the measured run after its steps."""


def _child(spec):
    """One corpus size in this fresh process (see the module docstring)."""
    import resource

    from tf_effitrain.config import load_config
    from tf_effitrain.training import TrainerPlugin, train

    import numpy as np

    config = load_config(spec["config"], spec["overrides"])
    steps = spec["steps"]
    found = {}

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    class Probe(TrainerPlugin):
        def callbacks(self, ctx):
            found["ctx"] = ctx
            keras = ctx.keras

            class Clock(keras.callbacks.Callback):
                def on_train_batch_end(self, batch, logs=None):
                    now = time.perf_counter()
                    if batch == 0:
                        found.update(first_step_s=now - _START, rss_first_step_mib=rss_mib(),
                                     steps_start=now)
                    if batch + 1 >= steps:
                        found["train_s"] = now - found["steps_start"]
                        raise _Stop()

            return [Clock()]

    try:
        train(config, plugins=[Probe()], overwrite=True)
    except _Stop:
        pass
    ctx = found["ctx"]
    # Tokens the measured steps trained on: steps 2..N of the first pass's batches.
    def real_tokens(batch):
        ids = batch[0]["token_ids"] if isinstance(batch[0], dict) else batch[0]
        return int(np.count_nonzero(ids)), int(ids.shape[0])

    batches = iter(ctx.data.train)
    trained = [real_tokens(next(batches)) for _ in range(steps)][1:]
    train_tokens = sum(t for t, _ in trained)
    # The input alone, in steady state: after the first batch (which waits for the
    # shuffle buffers to fill: that wait is in the time to first step), as many batches
    # as `fit` takes in an epoch, at most `probe`.
    probe = min(spec["probe_batches"], ctx.data.train_batches - 1)
    batches = iter(ctx.data.train)
    next(batches)
    start = time.perf_counter()
    count = tokens = examples = 0
    for _, batch in zip(range(probe), batches):
        t, _ = real_tokens(batch)
        tokens += t
        labels = np.asarray(batch[1])
        weights = batch[2] if len(batch) > 2 else None
        examples += int(np.count_nonzero(weights)) if weights is not None else len(labels)
        count += 1
    input_s = time.perf_counter() - start
    return {
        "examples": spec["size"], "mode": spec["mode"], "split_sizes": ctx.data.split_sizes,
        "train_batches": ctx.data.train_batches, "batching": config.data.batching,
        "vocabulary": len(ctx.data.vocab),
        "first_step_s": found["first_step_s"],
        "rss_first_step_mib": found["rss_first_step_mib"], "rss_peak_mib": rss_mib(),
        "train_tokens_per_s": train_tokens / max(found["train_s"], 1e-9),
        "measured_steps": steps - 1,
        "input_batches": count, "input_examples_per_s": examples / max(input_s, 1e-9),
        "input_tokens_per_s": tokens / max(input_s, 1e-9),
    }


def _run_child(spec):
    from tf_effitrain.bench._measure import child_environment

    done = subprocess.run(
        [sys.executable, "-m", "tf_effitrain.bench.data", json.dumps(spec)],
        capture_output=True, text=True, check=False, env=child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"bench data: the {spec['size']}-example process failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_learners(corpus, samples, vocab_size, keras_hub_limit, log):
    """Seconds each vocabulary learner takes on the first `n` texts of `corpus`."""
    from tf_effitrain.data.tokenizer import learn_vocabulary

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(max(samples)), f)]
    rows = []
    for n in samples:
        for learner in ("tokenizers", "keras_hub"):
            if learner == "keras_hub" and n > keras_hub_limit:
                continue  # minutes: the point is made at the smaller sample
            start = time.perf_counter()
            vocab = learn_vocabulary(texts[:n], vocab_size, learner=learner)
            rows.append({"learner": learner, "texts": n, "seconds": time.perf_counter() - start,
                         "tokens": len(vocab), "requested": vocab_size})
            log(f"  vocabulary {learner:10s} {n:>7,} texts {rows[-1]['seconds']:7.2f} s  "
                f"{len(vocab)} tokens")
    return rows


MODES = ("memory", "stream")


def bench_data(config_path, overrides, sizes=SIZES, out_dir="runs/bench/data", steps=20,
               probe_batches=200, learner_samples=(5_000, 50_000), keras_hub_limit=5_000,
               vocab_size=4000, source=None, modes=MODES, log=print):
    """The data suite (module docstring); `source`: the JSONL file the corpora are made
    from (default: the embedded one); `modes`: a subset of `MODES`. Returns a
    JSON-ready dict."""
    from tf_effitrain.bench._measure import cpu_name

    log = log or (lambda line: None)
    rows = []
    for mode in modes:
        for size in sizes:
            corpus = os.path.join(out_dir, "corpora", f"corpus_{size}.jsonl")
            if not os.path.isfile(corpus):
                make_corpus(size, corpus, source=source)
            spec = {"config": config_path, "size": size, "steps": steps, "mode": mode,
                    "probe_batches": probe_batches, "overrides": [
                        *overrides, f"data.path={corpus}", "data.source=jsonl",
                        f"data.stream={'true' if mode == 'stream' else 'false'}",
                        "data.vocab_cache=false", "training.epochs=1", "training.verbose=0",
                        "training.run_dir="
                        + os.path.join(out_dir, "runs", f"{mode}_{size}")]}
            start = time.perf_counter()
            row = _run_child(spec)
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            log(f"  {mode:6s} {size:>9,} examples: first step {row['first_step_s']:6.1f} s, "
                f"peak RSS {row['rss_peak_mib']:7.0f} MiB, input "
                f"{row['input_tokens_per_s']:9.0f} tokens/s vs training "
                f"{row['train_tokens_per_s']:7.0f} tokens/s")
    largest = os.path.join(out_dir, "corpora", f"corpus_{max(sizes)}.jsonl")
    learners = _time_learners(largest, [n for n in learner_samples if n <= max(sizes)],
                              vocab_size, keras_hub_limit, log)
    return {"suite": "data", "cpu": cpu_name(), "rows": rows, "learners": learners,
            "steps": steps, "sizes": list(sizes), "modes": list(modes)}


def run_suite(config, args, log=print):
    """The `bench data` suite (see `tf_effitrain.bench.suite`)."""
    quick = bool(getattr(args, "quick", False))
    overrides = list(getattr(args, "overrides", []) or []) + (QUICK if quick else [])
    config_path = getattr(args, "config", None) or "configs/demo_cpu.yaml"
    sizes = QUICK_SIZES if quick else SIZES
    if log:
        log(f"bench data: {config_path}, corpora of {', '.join(f'{s:,}' for s in sizes)} "
            "examples" + (" (quick)" if quick else ""))
    result = bench_data(config_path, overrides, sizes=sizes, out_dir=args.out_dir,
                        steps=5 if quick else 20, probe_batches=20 if quick else 200,
                        learner_samples=(1_000,) if quick else (5_000, 50_000),
                        keras_hub_limit=1_000 if quick else 5_000,
                        vocab_size=600 if quick else config.data.vocab_size,
                        source=config.data.path if config.data.source == "jsonl" else None,
                        # quick: the streamed path only (the in-memory one is in every test)
                        modes=("stream",) if quick else MODES, log=log)
    result["quick"] = quick
    return result


def format_result(result):
    """Markdown tables of `bench_data`'s result."""
    lines = ["| mode | examples | batching | time to first step (s) | peak RSS at first step "
             "(MiB) | peak RSS (MiB) | input examples/s | input real tokens/s | training "
             "real tokens/s | input / training |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['examples']:,} | {r['batching']} | {r['first_step_s']:.1f} | "
            f"{r['rss_first_step_mib']:,.0f} | {r['rss_peak_mib']:,.0f} | "
            f"{r['input_examples_per_s']:,.0f} | {r['input_tokens_per_s']:,.0f} | "
            f"{r['train_tokens_per_s']:,.0f} | "
            f"**{r['input_tokens_per_s'] / max(r['train_tokens_per_s'], 1e-9):.1f}x** |")
    for mode in result.get("modes", MODES):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        if len(rows) > 1:
            lines += ["", f"Peak RSS growth ({mode}) {rows[-2]['examples']:,} -> "
                          f"{rows[-1]['examples']:,} examples: "
                          f"{rows[-1]['rss_peak_mib'] / rows[-2]['rss_peak_mib']:.2f}x."]
    lines += ["", "| vocabulary learner | texts | seconds | tokens (requested) |",
              "|---|---|---|---|"]
    for r in result["learners"]:
        lines.append(f"| {r['learner']} | {r['texts']:,} | {r['seconds']:.2f} | "
                     f"{r['tokens']} ({r['requested']}) |")
    by = {(r["learner"], r["texts"]): r["seconds"] for r in result["learners"]}
    shared = [n for (learner, n) in by if learner == "keras_hub" and ("tokenizers", n) in by]
    for n in shared:
        lines.append("")
        lines.append(f"On {n:,} texts the `tokenizers` learner is "
                     f"**{by[('keras_hub', n)] / by[('tokenizers', n)]:.0f}x** faster.")
    lines += ["", f"Training steps measured: {result['steps'] - 1} (after the first); "
                  f"CPU: {result['cpu']}."
              + (" Quick run (small corpora, tiny model)." if result.get("quick") else "")]
    return "\n".join(lines)


def plot_result(result, path):
    """A PNG: time to first step and peak RSS against the number of examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_effitrain.bench._measure import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for mode in result.get("modes", MODES):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        x = [r["examples"] for r in rows]
        axes[0].plot(x, [r["first_step_s"] for r in rows], "-o", label=mode)
        axes[1].plot(x, [r["rss_peak_mib"] for r in rows], "-o", label=f"{mode}: peak")
        axes[2].plot(x, [r["input_tokens_per_s"] for r in rows], "-o",
                     label=f"{mode}: input alone")
        axes[2].plot(x, [r["train_tokens_per_s"] for r in rows], "--s",
                     label=f"{mode}: training")
    axes[0].set_title("time to first step (s)")
    axes[1].set_title("peak RSS (MiB)")
    axes[2].set_title("real tokens / s")
    for ax in axes:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("examples")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, f"bench data; {result['cpu']}")


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
