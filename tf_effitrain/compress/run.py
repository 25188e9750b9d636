"""`tf-effitrain compress RUN_DIR`: a finished run in, a compact fine-tuned run out.

Heads and FFN neurons are scored and removed (one-shot, or gradually over
`structured.iterations` rounds), chosen kernels factorized, then (tf_keras engine,
tfmot) kernels pruned to a sparsity while fine-tuning and/or quantization-aware
training; every stage is a run of the normal trainer (so metrics, best weights, report, export and
distillation from the uncompressed run all apply). The new run's report adds the
per-layer heads / widths / ranks kept, parameters, analytic FLOPs, measured batch-1 and
batch-32 CPU latency and accuracy, before and after.
"""

import dataclasses
import json
import os

from tf_effitrain.config import ConfigError, load_config
from tf_effitrain.errors import RunDirError
from tf_effitrain.training.trainer import TrainerPlugin

__all__ = ["compress_run", "CompactModelPlugin", "CompressionPlugin", "COMPRESSION_FILE"]

COMPRESSION_FILE = "compression.json"


def _structure(cfg):
    blocks = 1 if cfg.share_layers else cfg.num_layers
    return {"heads": list(cfg.layer_heads or [cfg.num_heads] * blocks),
            "ffn_dims": list(cfg.layer_ffn_dims or [cfg.ffn_dim] * blocks),
            "low_rank": list(cfg.low_rank)}


class CompactModelPlugin(TrainerPlugin):
    """Starts the run from given weights (the compact model the config describes) and,
    for the last stage, reports the comparison with the uncompressed run.

    Args:
        weights: list of arrays. The compact model's weights (builder order).
        source_run: str. The uncompressed run (its vocabulary is reused).
        summary: dict or None. Filled-in comparison to write (last stage only).
        tflite_latency: bool. Also time both models as float32 TFLite files.
    """

    def __init__(self, weights, source_run, summary=None, tflite_latency=True):
        self.weights = weights
        self.source_run = source_run
        self.summary = summary
        self.tflite_latency = tflite_latency

    def before_data(self, ctx):
        import shutil

        # The same token ids as the model being compressed.
        shutil.copyfile(os.path.join(self.source_run, "vocab.txt"),
                        os.path.join(ctx.vocab_dir, "vocab.txt"))

    def transform_model(self, ctx, model):
        model.set_weights(self.weights)
        return model

    def after_finish(self, ctx):
        if self.summary is None or not ctx.chief:
            return
        from tf_effitrain.compress.structured import analytic_flops

        s = self.summary
        length = ctx.config.data.max_length
        s["after"].update(params=int(ctx.model.count_params()),
                          flops=analytic_flops(ctx.model, ctx.config.model, length),
                          accuracy=(ctx.test or {}).get("accuracy"))
        s["latency_ms"] = _latencies(self.source_run, ctx.model_path, ctx.config,
                                     self.tflite_latency)
        with open(os.path.join(ctx.write_dir, COMPRESSION_FILE), "w", encoding="utf-8") as f:
            json.dump(s, f, indent=2)
        ctx.report_lines += _report_lines(s)


def _latencies(source_run, compact_path, config, tflite=True):
    """Batch-1 and batch-32 latency of the uncompressed and compact Keras models (and
    batch-1 of their float32 TFLite files), interleaved."""
    import numpy as np

    from tf_effitrain.bench.latency import keras_latencies
    from tf_effitrain.engine import get_keras

    # Each model in its own engine: a tfmot stage's output is tf_keras, its source
    # may be Keras 3.
    source_config = load_config(os.path.join(source_run, "config.yaml"))
    before = get_keras(source_config.runtime.engine).models.load_model(
        os.path.join(source_run, "model.keras"), compile=False)
    keras = get_keras(config.runtime.engine)
    if source_config.runtime.engine != config.runtime.engine:
        # Timed in the same engine (a tfmot stage's output is tf_keras): the source's
        # weights in its twin, so the ratio is the compression's, not the engine's.
        from tf_effitrain.models import build_transformer_classifier

        twin = build_transformer_classifier(
            source_config.model, before.get_layer("token_embedding").input_dim,
            before.get_layer("logits").units, source_config.data.max_length, keras=keras)
        twin.set_weights(before.get_weights())
        before = twin
    models = {"before": before,
              "after": keras.models.load_model(compact_path, compile=False)}
    rng = np.random.RandomState(0)
    length = config.data.max_length
    # Padded rows of realistic fill: half the positions real, the rest padding.
    rows = rng.randint(1, int(models["before"].get_layer("token_embedding").input_dim),
                       size=(32, length)).astype("int32")
    rows[:, length // 2:] = 0
    result = keras_latencies(models, rows, batch_sizes=(1, 32), timed=20, rounds=3)
    if tflite:
        result = {name: {**result[name], "tflite_1": ms}
                  for name, ms in _tflite_latencies(models, rows).items()}
    return result


def _tflite_latencies(models, rows, rounds=3):
    """Batch-1 latency (ms) of each model as a float32 TFLite file under XNNPack, one
    thread: the deployed form, with none of Keras' per-call overhead."""
    import shutil
    import tempfile

    import numpy as np

    from tf_effitrain.export.tflite import export_tflite
    from tf_effitrain.export.verify import run_tflite

    workdir = tempfile.mkdtemp(prefix="tf_effitrain_latency_")
    try:
        paths = {}
        for name, model in models.items():
            paths[name] = os.path.join(workdir, f"{name}.tflite")
            export_tflite(model, paths[name], "none", sequence_length=rows.shape[1])
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, path in paths.items():
                times[name] += run_tflite(path, rows, "xnnpack", threads=1)[1]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def _report_lines(s):
    b, a, lat = s["before"], s["after"], s["latency_ms"]
    heads = ", ".join(f"{h}/{o}" for h, o in zip(a["heads"], b["heads"]))
    widths = ", ".join(f"{h}/{o}" for h, o in zip(a["ffn_dims"], b["ffn_dims"]))

    def ratio(x, y):
        return f"{x / y:.2f}x" if x is not None and y else "-"

    def acc(v):
        return f"{v:.4f}" if v is not None else "-"

    lines = [
        "## Compression", "",
        f"From `{s['source_run']}`: {s['description']}.", "",
    ]
    if a["heads"] != b["heads"] or a["ffn_dims"] != b["ffn_dims"]:
        lines += [f"- Heads kept per layer (kept/before): {heads}",
                  f"- FFN width per layer (kept/before): {widths}"]
    if a["low_rank"]:
        lines.append(f"- Low-rank kernels (layer:rank): {', '.join(a['low_rank'])}")
    lines += [
        "", "| | before | after | ratio |", "|---|---|---|---|",
        f"| parameters | {b['params']:,} | {a['params']:,} | {ratio(a['params'], b['params'])} |",
        f"| FLOPs / example (length {s['length']}) | {b['flops']:,} | {a['flops']:,} | "
        f"{ratio(a['flops'], b['flops'])} |",
        f"| CPU latency, batch 1 (ms) | {lat['before'][1]:.2f} | {lat['after'][1]:.2f} | "
        f"{ratio(lat['after'][1], lat['before'][1])} |",
        f"| CPU latency, batch 32 (ms) | {lat['before'][32]:.2f} | {lat['after'][32]:.2f} | "
        f"{ratio(lat['after'][32], lat['before'][32])} |",
        *([f"| TFLite float32 latency, batch 1, XNNPack (ms) | {lat['before']['tflite_1']:.2f} "
           f"| {lat['after']['tflite_1']:.2f} | "
           f"{ratio(lat['after']['tflite_1'], lat['before']['tflite_1'])} |"]
          if "tflite_1" in lat["after"] else []),
        f"| test accuracy | {acc(b['accuracy'])} | {acc(a['accuracy'])} | "
        f"{ratio(a['accuracy'], b['accuracy'])} |", "",
    ]
    return lines


def _describe(cfg):
    parts = []
    st, lr = cfg.structured, cfg.low_rank
    if st.enabled:
        parts.append(f"{st.heads_fraction:.0%} of heads and {st.neurons_fraction:.0%} of FFN "
                     f"neurons removed ({st.method} scores, {st.scope} scope, "
                     f"{'one-shot' if st.iterations == 1 else f'{st.iterations} rounds'})")
    if lr.enabled:
        how = (f"rank {lr.rank}" if lr.rank else f"{lr.rank_fraction:.0%} of full rank"
               if lr.rank_fraction else f"{lr.energy:.0%} of the spectral energy")
        parts.append(f"{', '.join(lr.layers)} factorized ({how})")
    p = cfg.pruning
    if p.enabled:
        parts.append("tfmot pruning to " + (f"{p.m_by_n[0]}:{p.m_by_n[1]} sparsity" if p.m_by_n
                                            else f"{p.target_sparsity:.0%} sparsity ({p.schedule})"))
    if cfg.structured.enabled or cfg.low_rank.enabled or p.enabled:
        stages = (cfg.structured.enabled or cfg.low_rank.enabled) + p.enabled
        parts.append(f"fine-tuned {cfg.fine_tune_epochs} epoch(s)"
                     + (" per stage" if stages > 1 else "")
                     + (" with the uncompressed model as teacher" if cfg.distill else ""))
    if cfg.qat:
        parts.append(f"quantization-aware training {cfg.qat_epochs} epoch(s)"
                     + (", pruning-preserving" if p.enabled else ""))
    return "; ".join(parts)


def _stage_epochs(total, rounds):
    base, extra = divmod(total, rounds)
    return [max(1, base + (1 if i >= rounds - extra else 0)) for i in range(rounds)]


def _out_dir(run_dir, config, out_dir=None, overwrite=False):
    """The compressed run's directory, refused if it is, holds or lies in the source,
    or holds a finished run (unless `overwrite`)."""
    from tf_effitrain.training.rundir import run_status

    comp = config.compression
    out = out_dir or comp.run_dir or os.path.normpath(os.path.abspath(run_dir)) + "_compressed"
    source, target = os.path.realpath(run_dir), os.path.realpath(out)
    if target == source or target.startswith(source + os.sep) or source.startswith(target + os.sep):
        raise ConfigError(
            "The compressed run needs a directory of its own, outside the source run. "
            f"Received: compression.run_dir / --run-dir={out!r} for the run {run_dir!r}")
    if not overwrite and run_status(out) == "finished":
        raise RunDirError(
            f"{out!r} holds a finished run. Pass `--overwrite` to replace it, or choose "
            "another `--run-dir` / `compression.run_dir`.")
    return out


def check_compression(run_dir, config, out_dir=None, compare_source=True,
                      overwrite=False):
    """Everything about a compression request that can fail, checked before any work
    (no TensorFlow): a finished source run whose splits, vocabulary and model the config
    keeps, something to do, layer patterns that match, a separate output directory.

    Args:
        run_dir: str. The source run.
        config: `ExperimentConfig` with the `compression:` section.
        out_dir: str or None. The requested output directory.
        compare_source: bool. Check the config against the source's `config.yaml`
            (False when the source is the run about to be trained).
        overwrite: bool. Accept an output directory holding a finished run.

    Returns:
        str. The output directory.
    """
    import fnmatch

    from tf_effitrain.distill.teacher import SAME_DATA_KEYS
    from tf_effitrain.models.names import named_layers

    comp = config.compression
    if not comp.enabled:
        raise ConfigError(
            "Nothing to compress: set `compression.structured.heads_fraction` / "
            "`neurons_fraction` (> 0), one of `compression.low_rank.rank`, "
            "`rank_fraction`, `energy`, `compression.pruning.target_sparsity` (> 0) or "
            "`m_by_n`, and/or `compression.qat: true` (e.g. --set "
            "compression.pruning.target_sparsity=0.5).")
    if config.model.kind != "transformer":
        raise ConfigError("Compression applies to `model.kind: transformer` runs (the "
                          "toolkit's builder; tfmot needs its tf_keras twin). Received: "
                          f"model.kind={config.model.kind!r}")
    source_path = os.path.join(run_dir, "config.yaml")
    if compare_source and os.path.isfile(source_path):
        source = load_config(source_path)
        differ = [f"data.{k}" for k in (*SAME_DATA_KEYS, "max_length")
                  if getattr(source.data, k) != getattr(config.data, k)]
        differ += ["runtime.seed"] * (source.runtime.seed != config.runtime.seed)
        differ += ["model"] * (source.model != config.model)
        if differ:
            raise ConfigError(
                f"Compression keeps the source run's splits, vocabulary and model; these "
                f"settings differ from {source_path}: {', '.join(differ)}. Change only "
                "`compression.*`, `training.*`, `optimizer.*`, `schedule.*` or `export.*`.")
    if comp.low_rank.enabled:
        names = named_layers(config.model)
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in comp.low_rank.layers
                   if n.startswith(("block", "shared_block"))):
            raise ConfigError(
                f"`compression.low_rank.layers` {comp.low_rank.layers} matches no encoder "
                f"layer. Layers: {[n for n in names if n.startswith(('block', 'shared'))]}")
    if comp.pruning.enabled:
        _check_pruning_layers(config)
    return _out_dir(run_dir, config, out_dir, overwrite)


# The builder's layers with a kernel tfmot can prune (by name suffix).
_PRUNABLE_ROLES = ("_query", "_key", "_value", "_key_value", "_attention_output",
                   "_ffn_inner", "_ffn_output")


def _check_pruning_layers(config):
    import fnmatch

    from tf_effitrain.models.names import named_layers

    p = config.compression.pruning
    names = [n for n in named_layers(config.model)
             if n.endswith(_PRUNABLE_ROLES) or n in ("embedding_projection", "logits",
                                                     "token_embedding")]
    from tf_effitrain.compress.pruning import DEFAULT_LAYERS

    for pattern in p.layers:
        if pattern not in DEFAULT_LAYERS and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"`compression.pruning.layers` pattern {pattern!r} matches no prunable "
                f"layer. Prunable layers: {names}")


def compress_run(run_dir, config=None, out_dir=None, log=print, strategy=None,
                 overwrite=False):
    """Compresses a finished run into a new run directory.

    Args:
        run_dir: str. A finished `tf-effitrain train` run.
        config: `ExperimentConfig` or None. The settings to use (its `compression:`
            section says what to do); None: the run's own `config.yaml`.
        out_dir: str or None. The new run directory; None: `compression.run_dir`, else
            `<run_dir>_compressed`.
        log: callable. Progress lines.
        strategy: `tf.distribute.Strategy` or None. The fine-tuning's strategy (None:
            `runtime.strategy` of the config).
        overwrite: bool. Replace a finished run in the output directory.

    Returns:
        The final stage's `RunResult` (its `run_dir` holds `model.keras`, `report.md`,
        `compression.json`).

    Example:

    ```python
    config = et.load_config("runs/demo/config.yaml",
                            ["compression.structured.heads_fraction=0.5",
                             "compression.structured.neurons_fraction=0.5"])
    result = et.compress_run("runs/demo", config)
    ```
    """
    for name in ("config.yaml", "model.keras", "vocab.txt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise RunDirError(f"{os.path.join(run_dir, name)!r} not found: is {run_dir!r} "
                              "a finished `tf-effitrain train` run?")
    config = config or load_config(os.path.join(run_dir, "config.yaml"))
    comp = config.compression
    out_dir = check_compression(run_dir, config, out_dir, overwrite=overwrite)

    from tf_effitrain.compress.structured import (
        _removed,
        analytic_flops,
        factorize,
        prune_units,
        select_units,
        unit_scores,
    )
    from tf_effitrain.data.pipeline import prepare_data, unpacked
    from tf_effitrain.engine import get_keras
    from tf_effitrain.training import train
    from tf_effitrain.training.report import last_test_accuracy
    from tf_effitrain.training.trainer import precision_policy

    keras = get_keras(config.runtime.engine)
    cfg = config.model
    # Scored and cut in float32 (a mixed-precision model's small gradients would underflow
    # in the Taylor scores); fine-tuning then runs in the config's precision.
    # The same model, float32, no unit removed.
    model = _load_float32(os.path.join(run_dir, "model.keras"), config.runtime.engine, cfg)
    summary = {"source_run": run_dir, "description": _describe(comp),
               "compression": dataclasses.asdict(comp), "length": config.data.max_length,
               "before": {"params": int(model.count_params()),
                          "flops": analytic_flops(model, cfg, config.data.max_length),
                          "accuracy": last_test_accuracy(run_dir), **_structure(cfg)}}
    st = comp.structured
    rounds = st.iterations if st.enabled else 1
    epochs = _stage_epochs(comp.fine_tune_epochs, rounds)
    # The stages, in order: structured rounds (or none), tfmot pruning, QAT. Each is a
    # normal run; only the last writes `out_dir`.
    stages = [("structured", i) for i in range(rounds)] if (st.enabled or comp.low_rank.enabled) else []
    stages += [("pruning", 0)] * comp.pruning.enabled + [("qat", 0)] * comp.qat
    data = None
    if st.enabled and st.method == "taylor":
        # The run's own splits and vocabulary, no augmentation: scores on training data.
        data = prepare_data(unpacked(dataclasses.replace(config.data, token_shuffle=0.0)),
                            config.runtime.seed, run_dir)
    original = _structure(cfg)

    def target(sizes, fraction, stage):
        # Round `stage` keeps what the cumulative goal leaves of the ORIGINAL sizes, so
        # the last round lands where one-shot removal would (no drift from rounding).
        goal = fraction * (stage + 1) / rounds
        if st.scope == "global":
            return sum(sizes) - _removed(goal, sum(sizes))
        return {b: n - _removed(goal, n) for b, n in zip(blocks, sizes)}

    blocks = ["shared_block"] if cfg.share_layers else [f"block{i}" for i in range(cfg.num_layers)]
    result = None
    for index, (kind, stage) in enumerate(stages):
        last = index == len(stages) - 1
        with precision_policy(keras, "float32"):
            if kind == "structured" and st.enabled:
                scores = unit_scores(model, cfg, st.method, data.train if data else None,
                                     st.score_batches)
                model, cfg = prune_units(
                    model, cfg,
                    select_units(scores["heads"], scope=st.scope,
                                 keep=target(original["heads"], st.heads_fraction, stage)),
                    select_units(scores["neurons"], scope=st.scope,
                                 keep=target(original["ffn_dims"], st.neurons_fraction, stage)))
            if kind == "structured" and stage == rounds - 1 and comp.low_rank.enabled:
                lr = comp.low_rank
                model, cfg = factorize(model, cfg, layers=lr.layers, rank=lr.rank,
                                       rank_fraction=lr.rank_fraction, energy=lr.energy)
        stage_dir = out_dir if last else os.path.join(out_dir, f"stage{index + 1}")
        stage_config, what = _stage_config(config, cfg, kind, epochs[stage], stage_dir,
                                           last, run_dir)
        shape = (f": heads {_structure(cfg)['heads']}, FFN {_structure(cfg)['ffn_dims']}"
                 + (f", low-rank {cfg.low_rank}" if cfg.low_rank else "")
                 if st.enabled or comp.low_rank.enabled else "")
        log(f"compress: stage {index + 1}/{len(stages)} ({what}){shape}; "
            f"{stage_config.training.epochs} epoch(s) into {stage_dir}")
        if last:
            summary["after"] = _structure(cfg)
        plugins = [CompactModelPlugin(model.get_weights(), run_dir, summary if last else None,
                                      comp.tflite_latency)]
        if kind == "pruning":
            from tf_effitrain.compress.tfmot_plugins import PruningPlugin

            plugins.append(PruningPlugin(comp.pruning, summary if last else None))
        elif kind == "qat":
            from tf_effitrain.compress.tfmot_plugins import QATPlugin

            plugins.append(QATPlugin(comp.pruning if comp.pruning.enabled else None,
                                     summary if last else None))
        # Each stage starts over: an unfinished output is this command's own leftover.
        result = train(stage_config, strategy=strategy, plugins=plugins, resume="never",
                       overwrite=True)
        if not last:  # the next stage starts from this one's saved model (float32 copy)
            model = _load_float32(result.model_path, stage_config.runtime.engine, cfg)
    return result


def _load_float32(path, engine, cfg):
    from tf_effitrain.compress.structured import prune_units
    from tf_effitrain.engine import get_keras
    from tf_effitrain.training.trainer import precision_policy

    keras = get_keras(engine)
    with precision_policy(keras, "float32"):
        return prune_units(keras.models.load_model(path, compile=False), cfg)[0]


def _stage_config(config, cfg, kind, epochs, stage_dir, last, source_run):
    """One stage's run config, and a few words saying what the stage does."""
    comp = config.compression
    training = dataclasses.replace(config.training, epochs=epochs, run_dir=stage_dir)
    runtime = config.runtime
    what = "fine-tuning the compact model"
    if kind in ("pruning", "qat"):
        # tfmot works on tf_keras models only; the builder's layouts are identical in
        # both engines, so the weights move over as they are.
        runtime = dataclasses.replace(runtime, engine="tf_keras")
    if kind == "pruning":
        # The final mask must be the trained one: no earlier (less sparse) epoch's
        # weights restored at the end, no stop before the schedule's end.
        training = dataclasses.replace(training, epochs=comp.fine_tune_epochs,
                                       keep_best=False, early_stopping_patience=None)
        what = "tfmot pruning, in the model's tf_keras twin: tfmot supports tf_keras only"
    elif kind == "qat":
        # tfmot's fake-quant ops run in float32.
        runtime = dataclasses.replace(runtime, precision="float32")
        training = dataclasses.replace(training, epochs=comp.qat_epochs)
        what = ("quantization-aware training, float32, in the model's tf_keras twin: "
                "tfmot supports tf_keras only")
    data = config.data
    if data.batching == "pack" and (kind in ("pruning", "qat") or comp.distill):
        # tfmot's wrappers replace the model (its packed twin would not follow) and a
        # teacher takes one example per row.
        data = dataclasses.replace(data, batching="bucket")
        what += "; bucketed batches (packing does not combine with tfmot or a teacher)"
    stage_config = dataclasses.replace(
        config, model=cfg, training=training, runtime=runtime, data=data,
        compression=type(comp)(),  # the new run is a plain run of the compact model
        # Intermediate stages are not exported: only the final model ships.
        export=config.export if last else type(config.export)(),
        distillation=dataclasses.replace(config.distillation, teacher=source_run)
        if comp.distill else dataclasses.replace(config.distillation, teacher=""))
    return stage_config, what


class CompressionPlugin(TrainerPlugin):
    """The `compression:` section in `train`: compress the run once it is saved.

    Args:
        config: `ExperimentConfig` (with its `compression:` section).
    """

    def __init__(self, config):
        self.config = config
        self.out_dir = None
        self.overwrite = False

    def check_inputs(self, ctx):
        # Before training: a compression request that cannot work fails now, not after
        # the whole training run.
        self.overwrite = ctx.overwrite
        self.out_dir = check_compression(ctx.run_dir, self.config, compare_source=False,
                                         overwrite=ctx.overwrite)

    def after_finish(self, ctx):
        from tf_effitrain.engine import is_multi_worker

        if is_multi_worker(ctx.strategy):
            # The chief alone cannot run the fine-tuning's collectives.
            ctx.log("compression: skipped under MultiWorkerMirroredStrategy; run "
                    f"`tf-effitrain compress {ctx.run_dir}` afterwards (one process)")
            return
        from tf_effitrain.errors import TfEffitrainError

        try:
            result = compress_run(ctx.write_dir, self.config, out_dir=self.out_dir,
                                  log=ctx.log, strategy=ctx.strategy,
                                  overwrite=self.overwrite)
        except Exception as e:  # noqa: BLE001  the trained run must still be finished
            # The trained run stays complete (its report is written next); say why the
            # compressed one is missing.
            what = str(e) if isinstance(e, (TfEffitrainError, ValueError)) else \
                f"{type(e).__name__}: {e}"
            ctx.log(f"compression failed: {what}")
            ctx.report_lines += ["## Compression", "", f"Failed: {what}", ""]
            return
        ctx.report_lines += ["## Compression", "",
                             f"Compressed run: [{result.run_dir}]({result.run_dir}).", ""]
