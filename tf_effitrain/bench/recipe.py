"""`tf-effitrain bench recipe`: the toolkit's recipe against plain Keras, side by side.

Four ways to train the same model size on the same data for the same number of epochs
(hence the same examples), each repetition in a fresh process:

(a) **plain Keras 3**, as a competent user would write it without this toolkit: the
    same WordPiece vocabulary (keras-hub's `WordPieceTokenizer`), every example padded
    to `max_length`, keras-hub's `TokenAndPositionEmbedding` (masking padding), encoder
    blocks of the config's sizes (pre-norm, GELU, dropout), masked mean pooling,
    float32, AdamW with the config's rate, decay and clipping under a warmup + cosine
    schedule (Keras' `CosineDecay`), `model.fit` over a shuffled, batched, prefetched
    `tf.data` pipeline, no XLA. Written in `baseline_model` and `_baseline_child`, with
    two kinds of blocks: (a1) keras-hub's `TransformerEncoder`, the library block a
    user reaches for (it also drops attention probabilities: one rate for all); (a2)
    `keras.layers.MultiHeadAttention` blocks with dropout on the sub-layers' outputs
    only, the same computation as the toolkit's blocks.
(b) **the toolkit**: `tf_effitrain.train` on the config as given (by default
    `configs/demo_cpu.yaml`: packed rows, `precision: auto`), the same code path as
    `tf-effitrain train` (checkpoints, validation).
(c) **the toolkit with length buckets** (`data.batching: bucket`, all else as (b)):
    what packing adds over bucketing.

All see the same splits (the toolkit's deterministic split under each seed) and the
same vocabulary (learned once per seed on the training split, checked equal to the
toolkit's own). Measured per repetition: the training time of every epoch after the
first (the first traces the step), from its first batch to its last batch's end
(validation and epoch-end work excluded); real (non-padding) tokens per second = real
tokens of the training split / the **fastest** timed epoch (machine noise only adds
time: this shared machine shows stalls of seconds in some epochs; the mean-based figure
is kept too); the padding fraction
(computed tokens that are padding); the validation accuracy after the last epoch (not
the best epoch's, so all have seen the same examples). Repetitions interleave the three
(the order rotates with each seed) so machine noise lands on all; ratios are taken
within each seed.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

from tf_effitrain.bench._measure import child_environment, cpu_name, save_figure

__all__ = ["bench_recipe", "run_suite", "format_result", "plot_result", "baseline_model"]

ROLES = ("baseline", "baseline_mha", "recipe", "bucketed")
LABELS = {"baseline": "(a1) plain Keras 3, keras-hub encoder blocks",
          "baseline_mha": "(a2) plain Keras 3, MultiHeadAttention blocks",
          "recipe": "(b) tf_effitrain", "bucketed": "(c) tf_effitrain, length buckets"}
# role -> (child, what differs)
_CHILDREN = {"baseline": ("baseline", {"blocks": "keras_hub"}),
             "baseline_mha": ("baseline", {"blocks": "mha"}),
             "recipe": ("recipe", {}), "bucketed": ("recipe", {"batching": "bucket"})}
QUICK = ["data.max_examples=480", "data.vocab_size=600", "data.max_length=64",
         "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64",
         "training.epochs=2"]


def baseline_model(keras, vocab_size, num_classes, max_length, model_cfg, blocks="keras_hub"):
    """The plain Keras 3 model of (a), of the config's sizes, written as a Keras user would.

    Args:
        blocks: str. `"keras_hub"`: keras-hub's `TransformerEncoder` (pre-norm; its one
            dropout rate also drops attention probabilities). `"mha"`:
            `keras.layers.MultiHeadAttention` blocks with dropout on the sub-layers'
            outputs only, the toolkit blocks' computation.
    """
    import keras_hub

    d, rate = model_cfg.d_model, model_cfg.dropout
    inputs = keras.Input(shape=(max_length,), dtype="int32", name="token_ids")
    # mask_zero: the padding mask flows to the attention and the pooling.
    x = keras_hub.layers.TokenAndPositionEmbedding(vocab_size, max_length, d,
                                                   mask_zero=True)(inputs)
    x = keras.layers.Dropout(rate)(x)
    for _ in range(model_cfg.num_layers):
        if blocks == "keras_hub":
            x = keras_hub.layers.TransformerEncoder(
                model_cfg.ffn_dim, model_cfg.num_heads, dropout=rate, activation="gelu",
                normalize_first=True)(x)
            continue
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.MultiHeadAttention(model_cfg.num_heads, d // model_cfg.num_heads)(
            h, h)
        x = keras.layers.Add()([x, keras.layers.Dropout(rate)(h)])
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.Dense(model_cfg.ffn_dim, activation="gelu")(h)
        h = keras.layers.Dense(d)(h)
        x = keras.layers.Add()([x, keras.layers.Dropout(rate)(h)])
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)  # masked mean over real tokens
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


def _splits(config):
    """The toolkit's examples and split indices under `config.runtime.seed`."""
    from tf_effitrain.data.pipeline import select_and_split
    from tf_effitrain.data.sources import load_examples

    examples = load_examples(config.data)
    order, parts = select_and_split(examples, config.data, config.runtime.seed)
    subset = {name: ([examples.texts[order[i]] for i in idx],
                     [examples.labels[order[i]] for i in idx])
              for name, idx in parts.items()}
    return subset, examples.class_names


class _Clock:
    """Training time of each epoch (first batch start to last batch end) as a callback."""

    def __init__(self, keras):
        clock = self
        self.epochs = []

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                clock.start, clock.last, clock.batches = time.perf_counter(), None, 0

            def on_train_batch_end(self, batch, logs=None):
                clock.last, clock.batches = time.perf_counter(), clock.batches + 1

            def on_epoch_end(self, epoch, logs=None):
                if clock.last is not None:
                    clock.epochs.append({"seconds": clock.last - clock.start,
                                         "batches": clock.batches})

        self.callback = Callback()


def _timing(epochs, real_tokens, computed_tokens):
    timed = epochs[1:] or epochs
    seconds = [e["seconds"] for e in timed]
    fastest = min(seconds)
    return {"epoch_seconds": [e["seconds"] for e in epochs],
            "updates_per_epoch": epochs[0]["batches"] if epochs else 0,
            "timed_epochs": len(timed), "fastest_epoch_seconds": fastest,
            "real_tokens_per_epoch": int(real_tokens),
            "computed_tokens_per_epoch": int(computed_tokens),
            "padding_fraction": 1.0 - real_tokens / max(1, computed_tokens),
            "real_tokens_per_s": real_tokens / max(fastest, 1e-9),
            "real_tokens_per_s_mean": real_tokens * len(timed) / max(sum(seconds), 1e-9)}


def _baseline_child(spec):
    """(a): plain Keras 3 in this (fresh) process."""
    import keras
    import keras_hub
    import tensorflow as tf

    from tf_effitrain.config import load_config

    config = load_config(spec["config"], spec["overrides"])
    data, model_cfg, opt = config.data, config.model, config.optimizer
    keras.utils.set_random_seed(config.runtime.seed)
    keras.mixed_precision.set_global_policy("float32")
    splits, class_names = _splits(config)
    with open(spec["vocab"], encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f if line.strip()]
    tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=vocab, lowercase=data.lowercase, oov_token="[UNK]",
        sequence_length=data.max_length, dtype="int32")

    def arrays(name):
        texts, labels = splits[name]
        ids = np.asarray(tokenizer(tf.constant(texts)))  # padded with 0 ([PAD])
        return ids, np.asarray(labels, np.int32)

    x_train, y_train = arrays("train")
    x_val, y_val = arrays("validation")
    batch = data.batch_size
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
             .shuffle(len(x_train), seed=config.runtime.seed).batch(batch)
             .prefetch(tf.data.AUTOTUNE))
    steps = -(-len(x_train) // batch) * config.training.epochs
    warmup = int(config.schedule.warmup_fraction * steps)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), warmup_target=opt.learning_rate, warmup_steps=warmup)
    model = baseline_model(keras, len(vocab), len(class_names), data.max_length, model_cfg,
                           spec["blocks"])
    model.compile(optimizer=keras.optimizers.AdamW(
        schedule, weight_decay=opt.weight_decay, global_clipnorm=opt.global_clipnorm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    clock = _Clock(keras)
    model.fit(train, epochs=config.training.epochs, callbacks=[clock.callback], verbose=0)
    _, val_accuracy = model.evaluate(x_val, y_val, batch_size=batch, verbose=0)
    return {"role": spec["role"], "val_accuracy": float(val_accuracy),
            "params": int(model.count_params()), "precision": "float32",
            "batching": "padded to max_length", "jit_compile": False, "blocks": spec["blocks"],
            "examples": len(x_train),
            **_timing(clock.epochs, np.count_nonzero(x_train), x_train.size)}


def _recipe_child(spec):
    """(b): `tf_effitrain.train` on the config in this (fresh) process."""
    from tf_effitrain.config import load_config
    from tf_effitrain.training import TrainerPlugin, read_metrics, train

    config = load_config(spec["config"], spec["overrides"])
    clock = {}

    class Clock(TrainerPlugin):
        def callbacks(self, ctx):
            clock["clock"], clock["ctx"] = _Clock(ctx.keras), ctx
            return [clock["clock"].callback]

    result = train(config, plugins=[Clock()], overwrite=True)
    ctx = clock["ctx"]
    records = read_metrics(os.path.join(result.run_dir, "metrics.jsonl"))
    last = [r for r in records if r.get("split") == "train"][-1]
    # One pass over the training batches as `fit` got them: what was computed.
    real = computed = 0
    for batch in ctx.data.train:
        ids = batch[0]["token_ids"] if isinstance(batch[0], dict) else batch[0]
        real += int(np.count_nonzero(ids))
        computed += int(np.prod(ids.shape))
    with open(os.path.join(result.run_dir, "vocab.txt"), encoding="utf-8") as f, \
            open(spec["vocab"], encoding="utf-8") as g:
        same_vocab = f.read() == g.read()
    return {"role": spec.get("role", "recipe"), "val_accuracy": float(last["val_accuracy"]),
            "params": int(result.params["total"]), "precision": result.precision,
            "batching": config.data.batching, "jit_compile": config.training.jit_compile,
            "examples": ctx.data.split_sizes["train"], "same_vocabulary": same_vocab,
            **_timing(clock["clock"].epochs, real, computed)}


def _run_child(role, spec):
    done = subprocess.run(
        [sys.executable, "-m", "tf_effitrain.bench.recipe", role, json.dumps(spec)],
        capture_output=True, text=True, check=False, env=child_environment())
    if done.returncode != 0:
        raise RuntimeError(f"bench recipe: the {role} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_recipe(config, seeds=(0, 1, 2), run_root="runs/bench/recipe", roles=ROLES,
                 log=print):
    """Interleaved repetitions of (a) plain Keras and (b) the toolkit (module docstring).

    Args:
        config: `ExperimentConfig` (the recipe, and the model size and data for both).
        seeds: sequence of int. One repetition of each per seed (its own splits).
        roles: sequence of str. Which of `ROLES` to run (a and b at least).
        run_root: str. The toolkit's runs go to `run_root/seed<N>`.
        log: callable or None.

    Returns:
        dict (JSON): `rows` (one per seed and role), `summary` (means, spreads,
        standard errors, the ratio b / a per seed), `cpu`, the setting.
    """
    from tf_effitrain.config import save_config
    from tf_effitrain.data.tokenizer import load_or_learn_vocabulary

    log = log or (lambda line: None)
    rows = []
    for n, seed in enumerate(seeds):
        seeded = dataclasses.replace(config, runtime=dataclasses.replace(
            config.runtime, seed=seed))
        seed_dir = os.path.join(run_root, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        config_path = os.path.join(seed_dir, "bench_config.yaml")
        save_config(seeded, config_path)
        splits, _ = _splits(seeded)
        vocab_path = os.path.join(seed_dir, "baseline_vocab.txt")
        if os.path.exists(vocab_path):
            os.remove(vocab_path)  # learned again: the data may have changed
        # The same vocabulary for both: the toolkit's learner on this seed's training
        # split (the toolkit run learns it again; the row says whether they agree).
        data = seeded.data
        load_or_learn_vocabulary(vocab_path, splits["train"][0], data.vocab_size,
                                 data.lowercase, learner=data.vocab_learner,
                                 sample=data.vocab_sample, seed=seed,
                                 vocab_file=data.vocab_file)
        shift = n % len(roles)  # each seed starts with another role
        for role in roles[shift:] + roles[:shift]:
            child, what = _CHILDREN[role]
            spec = {"role": role, "config": config_path, "vocab": vocab_path,
                    "blocks": what.get("blocks"), "overrides": [
                        f"training.run_dir={os.path.join(seed_dir, role)}",
                        "training.verbose=0"] + ([f"data.batching={what['batching']}"]
                                                 if "batching" in what else [])}
            start = time.perf_counter()
            row = _run_child(child, spec)
            row.update(seed=seed, wall_s=time.perf_counter() - start)
            rows.append(row)
            log(f"  seed {seed} {role:8s} {row['real_tokens_per_s']:9.0f} real tokens/s  "
                f"padding {row['padding_fraction']:.1%}  val accuracy "
                f"{row['val_accuracy']:.4f}  ({row['wall_s']:.0f} s)")
    return {"suite": "recipe", "cpu": cpu_name(), "seeds": list(seeds),
            "model": dataclasses.asdict(config.model), "data": {
                "path": config.data.path, "max_length": config.data.max_length,
                "batch_size": config.data.batch_size, "batching": config.data.batching},
            "epochs": config.training.epochs, "rows": rows, "summary": _summary(rows)}


def _stats(values):
    values = np.asarray(values, np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std,
            "sem": std / np.sqrt(len(values)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def _summary(rows):
    by = {role: sorted((r for r in rows if r["role"] == role), key=lambda r: r["seed"])
          for role in ROLES}
    summary = {role: {key: _stats([r[key] for r in by[role]]) for key in (
        "real_tokens_per_s", "real_tokens_per_s_mean", "val_accuracy", "padding_fraction")}
        for role in ROLES if by[role]}

    def speedup(b, a, key="real_tokens_per_s"):
        return _stats([y[key] / x[key] for x, y in zip(by[a], by[b])])

    summary["speedup"] = speedup("recipe", "baseline")
    summary["speedup_mean_times"] = speedup("recipe", "baseline", "real_tokens_per_s_mean")
    if by["baseline_mha"]:
        summary["speedup_vs_mha"] = speedup("recipe", "baseline_mha")
        summary["speedup_vs_mha_mean_times"] = speedup("recipe", "baseline_mha",
                                                       "real_tokens_per_s_mean")
    if by["bucketed"]:
        summary["bucketed_speedup"] = speedup("bucketed", "baseline")
        summary["packing_vs_bucketing"] = speedup("recipe", "bucketed")
    base, recipe = summary["baseline"]["val_accuracy"], summary["recipe"]["val_accuracy"]
    summary["accuracy_difference"] = recipe["mean"] - base["mean"]
    summary["within_one_standard_error"] = bool(
        abs(recipe["mean"] - base["mean"]) <= base["sem"])
    # The speed-up must not cost accuracy: (b) no lower than (a) minus a's standard error.
    summary["no_accuracy_cost"] = bool(recipe["mean"] >= base["mean"] - base["sem"])
    return summary


def run_suite(config, args, log=print):
    """The `bench recipe` suite (see `tf_effitrain.bench.suite`)."""
    from tf_effitrain.config import load_config

    overrides = list(getattr(args, "overrides", []) or [])
    quick = bool(getattr(args, "quick", False))
    if quick:
        overrides = [*overrides, *QUICK]
        config = load_config(getattr(args, "config", None) or "configs/demo_cpu.yaml",
                             overrides)
    seeds = tuple(range(1 if quick else getattr(args, "seeds", 3) or 3))
    run_root = args.run_root
    if log:
        log(f"bench recipe: plain Keras vs the toolkit ({config.data.batching} batching, "
            f"precision {config.runtime.precision})" + ("" if quick else
                                                        ", both plain-Keras block kinds and "
                                                        "the toolkit with length buckets")
            + f", {config.model.num_layers} layer(s), d_model {config.model.d_model}, "
            f"{config.training.epochs} epochs, seeds {list(seeds)}"
            + (" (quick)" if quick else ""))
    # --quick checks the pipeline: a2 and c run the children of a1 and b (other settings).
    roles = ("baseline", "recipe") if quick else ROLES
    result = bench_recipe(config, seeds=seeds, run_root=run_root, roles=roles, log=log)
    result["quick"] = quick
    return result


def format_result(result):
    """A Markdown table of `bench_recipe`'s result."""
    s = result["summary"]
    lines = ["| | real tokens/s (mean ± std) | per seed | padding computed | "
             "val accuracy (mean ± std) | precision | batching |", "|---|---|---|---|---|---|---|"]
    for role in ROLES:
        rows = [r for r in result["rows"] if r["role"] == role]
        if not rows:
            continue
        t, acc, pad = (s[role][k] for k in ("real_tokens_per_s", "val_accuracy",
                                              "padding_fraction"))
        lines.append(
            f"| {LABELS[role]} | {t['mean']:,.0f} ± {t['std']:,.0f} | "
            + ", ".join(f"{v:,.0f}" for v in t["values"])
            + f" | {pad['mean']:.1%} | {acc['mean']:.4f} ± {acc['std']:.4f} | "
            f"{rows[0]['precision']} | {rows[0]['batching']} |")

    def ratio_text(stat):
        return (f"**{stat['mean']:.2f}x** ± {stat['std']:.2f} ("
                + ", ".join(f"{v:.2f}x" for v in stat["values"]) + ")")

    lines += ["", f"Speed-up b / a1 (real tokens/s, fastest epoch, per seed): "
              f"{ratio_text(s['speedup'])}; from mean epoch times: "
              f"{s['speedup_mean_times']['mean']:.2f}x."]
    if "speedup_vs_mha" in s:
        lines.append(f"Speed-up b / a2: {ratio_text(s['speedup_vs_mha'])}; from mean epoch "
                     f"times: {s['speedup_vs_mha_mean_times']['mean']:.2f}x.")
    if "packing_vs_bucketing" in s:
        lines.append(f"Packing over length buckets, b / c: {ratio_text(s['packing_vs_bucketing'])}"
                     f"; buckets over plain Keras, c / a: {s['bucketed_speedup']['mean']:.2f}x.")
    lines += [f"Validation accuracy b - a1: {s['accuracy_difference']:+.4f} (standard "
              f"error of a1: {s['baseline']['val_accuracy']['sem']:.4f}: "
              + ("within" if s["within_one_standard_error"] else "outside")
              + " one standard error; "
              + ("no accuracy cost" if s["no_accuracy_cost"] else
                 "b is lower by more than one standard error") + ").",
              "", f"Model: {result['model']['num_layers']} layer(s), d_model "
              f"{result['model']['d_model']}, {result['model']['num_heads']} heads, FFN "
              f"{result['model']['ffn_dim']}; {result['epochs']} epochs (the first, which "
              f"traces, is not timed); batch {result['data']['batch_size']}, max length "
              f"{result['data']['max_length']}. CPU: {result['cpu']}."
              + (" Quick run (tiny model, few examples): not the config's figures."
                 if result.get("quick") else "")]
    return "\n".join(lines)


def plot_result(result, path):
    """A PNG: real tokens/s and validation accuracy of each way, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    seeds = result["seeds"]
    roles = [r for r in ROLES if any(row["role"] == r for row in result["rows"])]
    width = 0.8 / len(roles)
    colors = {"baseline": "tab:gray", "baseline_mha": "silver", "recipe": "tab:blue",
              "bucketed": "tab:orange"}
    for i, role in enumerate(roles):
        rows = {r["seed"]: r for r in result["rows"] if r["role"] == role}
        xs = np.arange(len(seeds)) + (i - (len(roles) - 1) / 2) * width
        for ax, key in zip(axes, ("real_tokens_per_s", "val_accuracy")):
            ax.bar(xs, [rows[s][key] for s in seeds], width, label=LABELS[role],
                   color=colors[role])
    for ax, title in zip(axes, ("real (non-padding) tokens / s", "validation accuracy")):
        ax.set_xticks(range(len(seeds)))
        ax.set_xticklabels([f"seed {s}" for s in seeds])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    speed = result["summary"]["speedup"]
    return save_figure(fig, path, f"bench recipe: {speed['mean']:.2f}x real tokens/s; "
                             f"{result['cpu']}")


if __name__ == "__main__":
    role, spec = sys.argv[1], json.loads(sys.argv[2])
    child = {"baseline": _baseline_child, "recipe": _recipe_child}[role]
    print(json.dumps(child(spec)))
