"""`tf-effitrain` command line: train, distill, compress, evaluate, export, predict,
check, bench, info.

Arguments are parsed and configs validated before TensorFlow is imported: `--help` and
a config typo answer at once, without TensorFlow's start-up lines.
"""

import argparse
import json
import os
import sys

from tf_effitrain.config.choices import ENGINES
from tf_effitrain.training.rundir import RESUME_MODES

__all__ = ["main"]


def _add_run_dir_arguments(p):
    """`--run-dir`, `--resume`, `--overwrite` of the commands that train a run."""
    p.add_argument("--run-dir", help="run directory (default: training.run_dir)")
    p.add_argument("--resume", choices=RESUME_MODES, default="auto",
                   help="auto (default): resume an unfinished run of the same config in "
                   "the run directory from its newest checkpoint; never: do not")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run (finished or not) in the run directory")


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="tf-effitrain",
        description="Fast, cheap Transformer training with TensorFlow/Keras.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value, e.g. "
                   "--set training.epochs=3 (repeatable)")
    _add_run_dir_arguments(p)

    p = sub.add_parser("distill", help="train a student (its `model:` section) against a "
                       "finished teacher run (`distillation.teacher`); saves the student only")
    p.add_argument("config", help="YAML config with a `distillation:` section, e.g. "
                   "configs/distill_demo.yaml")
    p.add_argument("--teacher", help="teacher run directory (overrides "
                   "distillation.teacher)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value (repeatable)")
    _add_run_dir_arguments(p)

    p = sub.add_parser("compress", help="remove heads / FFN neurons, factorize kernels, "
                       "prune (tfmot, unstructured or 2:4) and/or quantization-aware train "
                       "a finished run, and write a new run directory")
    p.add_argument("run_dir", help="a directory written by `tf-effitrain train`")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override the run's config, e.g. --set "
                   "compression.structured.heads_fraction=0.5, --set "
                   "compression.pruning.target_sparsity=0.8, --set compression.qat=true "
                   "(repeatable)")
    p.add_argument("--run-dir", dest="run_dir_out", help="the new run directory "
                   "(default: compression.run_dir, else RUN_DIR_compressed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in the new run directory")

    p = sub.add_parser("evaluate", help="evaluate a finished run's model")
    p.add_argument("run_dir", help="a directory written by `tf-effitrain train`")
    p.add_argument("--split", default="test", choices=("test", "validation", "train"))

    p = sub.add_parser("check", help="check a config before running it on special hardware")
    p.add_argument("--tpu", action="store_true", required=True,
                   help="TPU readiness: static shapes, int32 inputs, no Python in the "
                   "pipeline, reachable data paths")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value (repeatable)")

    from tf_effitrain.bench.suite import SUITES

    p = sub.add_parser(
        "bench", help="measure an efficiency method (ratios in one run)",
        description="Each suite writes result.json, result.md (a table) and result.png "
        "into its own directory (--out-dir, default runs/bench/SUITE). Suites: "
        + "; ".join(f"{name}: {what}" for name, (_, _, what) in SUITES.items()) + ".")
    p.add_argument("what", choices=tuple(SUITES), metavar="SUITE",
                   help="one of: " + ", ".join(SUITES))
    p.add_argument("--quick", action="store_true",
                   help="a tiny setting of the same suite (under 2 minutes): checks the "
                   "pipeline and the output, not the figures")
    p.add_argument("--out-dir", default=None,
                   help="where result.json / .md / .png go (default runs/bench/SUITE)")
    p.add_argument("--config", default=None,
                   help="take the model and data from this YAML config (default: the "
                   "built-in defaults, i.e. the CPU demo model; recipe, compress and "
                   "pruning: configs/demo_cpu.yaml; distill: the student, default "
                   "configs/distill_demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--micro-batch", type=int, default=32,
                   help="accumulation, precision, mfu: (micro-)batch size per step")
    p.add_argument("-k", "--accumulation-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=None,
                   help="accumulation, precision, mfu, inference: timed steps per "
                   "configuration")
    p.add_argument("--rounds", type=int, default=None,
                   help="inference: interleaved rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="inference: TFLite interpreter threads (default export.threads)")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--teacher-config", default="configs/demo_cpu.yaml",
                   help="distill: the teacher's YAML config; --set applies to both")
    p.add_argument("--seeds", type=int, default=3,
                   help="recipe, distill, compress, pruning: repetitions (seeds 0..N-1)")
    p.add_argument("--run-root", default=None, help="recipe, distill, compress, pruning: "
                   "where the runs are written (default OUT_DIR/runs)")
    p.add_argument("--fine-tune-epochs", type=int, default=3,
                   help="compress, pruning: fine-tuning epochs per level")
    p.add_argument("--plot", default=None, help="also write the plot (PNG) here")
    p.add_argument("--levels", default=None, help="compress, pruning: comma-separated "
                   "level names (compress also knows 'heads+ffn 50%% distilled', "
                   "'heads+ffn 50%% gradual', 'ffn rank 1/2 distilled')")

    p = sub.add_parser("export", help="export a finished run's model (TFLite / SavedModel) "
                       "and verify the files on its test split")
    p.add_argument("run_dir", help="a directory written by `tf-effitrain train`")
    p.add_argument("--format", dest="formats", default=None,
                   help="comma-separated: tflite, saved_model (default: the run's "
                   "export.formats, i.e. tflite)")
    p.add_argument("--quantize", default=None,
                   help="comma-separated: none, float16, dynamic, int8 (default: the run's "
                   "export.quantize, else all four)")
    p.add_argument("--sequence-length", type=int, default=None,
                   help="fixed input length of the files (default: data.max_length)")
    p.add_argument("--samples", type=int, default=None,
                   help="representative training examples for int8 calibration")
    p.add_argument("--allow-flex", action="store_true",
                   help="accept ops that need the Flex (Select TF ops) delegate")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads")
    p.add_argument("--debug-quantization", action="store_true",
                   help="add a per-layer float-vs-int8 error table to the report")
    p.add_argument("--int8-output", action="store_true",
                   help="the int8 file returns int8 logits (scale and zero point in the "
                   "file) instead of float32")
    p.add_argument("--out", default=None, help="folder for the files (default RUN/export)")

    p = sub.add_parser("predict", help="classify raw texts with a .keras or .tflite model")
    p.add_argument("model", help="RUN/model.keras or an exported .tflite file (with "
                   "tokenizer.json and vocab.txt beside it)")
    p.add_argument("texts", nargs="*", help="texts to classify (none: read --file or stdin, "
                   "one text per line)")
    p.add_argument("--file", help="read texts from this file, one per line")
    p.add_argument("--json", action="store_true", help="one JSON object per text")

    p = sub.add_parser("info", help="devices, engine, precision, strategy")
    p.add_argument("--engine", default="keras3", choices=ENGINES)
    return parser


def _train(args):
    from tf_effitrain.config import ConfigError, load_config

    overrides = list(args.overrides)
    if getattr(args, "teacher", None):
        overrides.append(f"distillation.teacher={args.teacher}")
    config = load_config(args.config, overrides)
    args.train_run_dir = args.run_dir or config.training.run_dir  # for an interrupt's hint
    if args.command == "distill" and not config.distillation.teacher:
        raise ConfigError(
            "`tf-effitrain distill` needs a teacher: set `distillation.teacher` to a "
            "finished run directory in the config, or pass --teacher RUN_DIR.")
    from tf_effitrain.training import train

    result = train(config, run_dir=args.run_dir, resume=args.resume,
                   overwrite=args.overwrite)
    test = result.test or {}
    print()
    if not result.chief:
        print(f"worker done ({result.strategy}); the chief writes {result.run_dir}")
        return
    if "accuracy" in test:
        print(f"test accuracy: {test['accuracy']:.4f}  (majority-class baseline: "
              f"{result.majority_baseline:.4f})")
    if "macro_f1" in test:
        print(f"test macro-F1: {test['macro_f1']:.4f}  (per class: report.md)")
    kept = (f"epoch {result.best_epoch} of {result.epochs_run} (best "
            f"{config.training.best_metric})" if result.best_epoch else "last epoch")
    print(f"weights kept: {kept}")
    print(f"wall time: {result.wall_time_s:.1f} s")
    print(f"run directory: {result.run_dir}")
    print(f"  model:   {result.model_path}")
    print(f"  metrics: {result.metrics_path}")
    print(f"  report:  {result.report_path}")
    if config.compression.enabled:
        from tf_effitrain.training.report import last_test_accuracy
        from tf_effitrain.training.rundir import run_status

        out = config.compression.run_dir or os.path.normpath(
            os.path.abspath(result.run_dir)) + "_compressed"
        if run_status(out) == "finished":
            accuracy = last_test_accuracy(out)
            print(f"compressed run: {out}" + (f"  (test accuracy {accuracy:.4f})"
                                              if accuracy is not None else ""))
        else:
            print(f"compressed run: not written (see {result.report_path})")


def _compress(args):
    from tf_effitrain.config import load_config
    from tf_effitrain.errors import RunDirError

    path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise RunDirError(f"{path!r} not found: is {args.run_dir!r} a finished "
                          "`tf-effitrain train` run?")
    config = load_config(path, args.overrides)
    from tf_effitrain.compress.run import compress_run

    result = compress_run(args.run_dir, config, out_dir=args.run_dir_out,
                          log=lambda line: print(line, flush=True),
                          overwrite=args.overwrite)
    print()
    print(f"test accuracy: {result.test['accuracy']:.4f}" if result.test else "no test split")
    print(f"compressed run: {result.run_dir}")
    print(f"  model:  {result.model_path}")
    print(f"  report: {result.report_path} (before/after: parameters, FLOPs, latency)")


def _evaluate(args):
    from tf_effitrain.training import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split)
    print(json.dumps({"split": args.split, **{k: round(v, 6) for k, v in result.items()}}))


def _bench(args, argv=None):
    from tf_effitrain.bench.suite import run_bench

    if args.steps is None and args.what in ("accumulation", "precision"):
        args.steps = 5
    _, paths = run_bench(args.what, args, argv=argv,
                         log=lambda line: print(line, flush=True))
    print()
    with open(paths["md"], encoding="utf-8") as f:  # the table, without title and plot
        print(f.read().split("\n\n", 2)[-1].replace("\n\n![plot](result.png)\n", ""))
    print(f"written: {paths['json']}, {paths['md']}, {paths['png']}")


def _check(args):
    import tempfile

    from tf_effitrain.config import load_config

    config = load_config(args.config, args.overrides)
    from tf_effitrain.data import prepare_data
    from tf_effitrain.runtime.tpu_check import check_tpu_readiness

    with tempfile.TemporaryDirectory() as tmp:  # the vocabulary is learned, not kept
        data = prepare_data(config.data, config.runtime.seed, tmp)
        problems = check_tpu_readiness(config, data.train)
    if not problems:
        inputs = data.train.element_spec[0]
        ids = inputs["token_ids"] if isinstance(inputs, dict) else inputs
        print(f"{args.config}: ready for TPUStrategy (static int32 batches of "
              f"{tuple(ids.shape)}" + (", packed rows" if isinstance(inputs, dict) else "")
              + ", no Python in the pipeline)")
        return 0
    print(f"{args.config}: {len(problems)} problem(s) for TPUStrategy:")
    for problem in problems:
        print(f"- {problem}")
    return 1


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()]


def _export(args):
    import os

    from tf_effitrain.config import load_config
    from tf_effitrain.errors import RunDirError

    config_path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise RunDirError(f"{config_path!r} not found: is {args.run_dir!r} a finished "
                          "`tf-effitrain train` run?")
    cfg = load_config(config_path).export
    from tf_effitrain.export.run_export import EXPORT_REPORT, export_run

    report = export_run(
        args.run_dir,
        formats=_csv(args.formats) if args.formats else cfg.formats,
        quantizations=_csv(args.quantize) if args.quantize else (
            cfg.quantize or ["none", "float16", "dynamic", "int8"]),
        sequence_length=args.sequence_length or cfg.sequence_length,
        num_samples=args.samples or cfg.representative_samples,
        allow_flex=args.allow_flex or cfg.allow_flex,
        threads=args.threads or cfg.threads, delegates=cfg.delegates,
        debug_quantization=args.debug_quantization or cfg.debug_quantization,
        out_dir=args.out, int8_output=args.int8_output)
    print(f"report: {os.path.join(args.run_dir, EXPORT_REPORT + '.md')}")


def _predict(args):
    from tf_effitrain.export.predict import TextClassifier

    texts = list(args.texts)
    if args.file:
        from tf_effitrain.data.sources import read_text_file

        texts += [t for t in read_text_file(args.file, "A text file").splitlines() if t.strip()]
    if not texts:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    classifier = TextClassifier(args.model)
    labels, probabilities = classifier.predict(texts)
    for text, label, probs in zip(texts, labels, probabilities):
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": {
                name: round(float(p), 6) for name, p in zip(classifier.class_names, probs)}}))
        else:
            print(f"{label}\t{probs.max():.4f}\t{text[:70]}")


def _info(args):
    from tf_effitrain.runtime import runtime_info

    for key, value in runtime_info(args.engine).items():
        print(f"{key:>10}: {value}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Data and config warnings as one `tf-effitrain: warning:` line each."""
    print(f"tf-effitrain: warning: {message}", file=file or sys.stderr, flush=True)


def _resume_hint(args):
    """For a `train` stopped by a second Ctrl-C: the newest checkpoint, and how to go on."""
    run_dir = getattr(args, "train_run_dir", None)
    if not run_dir:
        return ""
    from tf_effitrain.training.checkpoint import CHECKPOINT_DIR, list_checkpoints

    found = list_checkpoints(os.path.join(run_dir, CHECKPOINT_DIR))
    if not found:
        return ""
    return (f"; newest checkpoint {os.path.relpath(found[0], run_dir)} in {run_dir!r}. "
            "Run the same command again (without `--overwrite`) to resume from it.")


def main(argv=None):
    """Entry point of the `tf-effitrain` command."""
    # Before TensorFlow is imported (nothing above imports it): keep its C++ start-up
    # chatter out.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _build_parser().parse_args(argv)
    import warnings

    from tf_effitrain.errors import DataWarning, TfEffitrainError, TrainingInterrupted

    commands = {"train": _train, "distill": _train, "compress": _compress,
                "evaluate": _evaluate, "check": _check,
                "bench": _bench, "export": _export, "predict": _predict, "info": _info}
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _show_warning
            warnings.simplefilter("always", DataWarning)
        try:
            code = (_bench(args, argv if argv is not None else sys.argv[1:])
                    if args.command == "bench" else commands[args.command](args))
        except TrainingInterrupted as e:
            if args.debug:
                raise
            print(f"tf-effitrain: {e}", file=sys.stderr)
            return 130
        except (TfEffitrainError, FileNotFoundError) as e:
            if args.debug:
                raise
            print(f"tf-effitrain: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"tf-effitrain: interrupted{_resume_hint(args)}", file=sys.stderr)
            return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
