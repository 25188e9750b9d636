"""`tf-effitrain` command line: train, evaluate, info."""

import argparse
import json
import os
import sys

__all__ = ["main"]


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
    p.add_argument("--run-dir", help="run directory (default: training.run_dir)")

    p = sub.add_parser("evaluate", help="evaluate a finished run's model")
    p.add_argument("run_dir", help="a directory written by `tf-effitrain train`")
    p.add_argument("--split", default="test", choices=("test", "validation", "train"))

    p = sub.add_parser("bench", help="measure an efficiency method (ratios in one run)")
    p.add_argument("what", choices=("accumulation",),
                   help="accumulation: peak memory and speed of k micro-batches per update")
    p.add_argument("--config", default=None,
                   help="take the model (and data.max_length) from this YAML config "
                   "(default: the built-in defaults, i.e. the CPU demo model)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("-k", "--accumulation-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed updates per configuration")
    p.add_argument("--out", help="also write the result as JSON here")

    p = sub.add_parser("info", help="devices, engine, precision, strategy")
    p.add_argument("--engine", default="keras3", choices=("keras3", "tf_keras"))
    return parser


def _train(args):
    from tf_effitrain.config import load_config
    from tf_effitrain.training import train

    config = load_config(args.config, args.overrides)
    result = train(config, run_dir=args.run_dir)
    test = result["test"] or {}
    print()
    if "accuracy" in test:
        print(f"test accuracy: {test['accuracy']:.4f}  (majority-class baseline: "
              f"{result['majority_baseline']:.4f})")
    print(f"wall time: {result['wall_time_s']:.1f} s")
    print(f"run directory: {result['run_dir']}")
    print(f"  model:   {result['model_path']}")
    print(f"  metrics: {result['metrics_path']}")
    print(f"  report:  {result['report_path']}")


def _evaluate(args):
    from tf_effitrain.training import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split)
    print(json.dumps({"split": args.split, **{k: round(v, 6) for k, v in result.items()}}))


def _bench(args):
    from tf_effitrain.bench import bench_accumulation, format_accumulation
    from tf_effitrain.config import load_config

    config = load_config(args.config, args.overrides)
    print(f"bench accumulation: {config.model.num_layers} layers, d_model "
          f"{config.model.d_model}, sequence {config.data.max_length}, micro-batch "
          f"{args.micro_batch}, k={args.accumulation_steps}, {args.steps} timed updates each")
    result = bench_accumulation(
        config.model, vocab_size=config.data.vocab_size, max_length=config.data.max_length,
        micro_batch=args.micro_batch, k=args.accumulation_steps, steps=args.steps,
        engine=config.runtime.engine, seed=config.runtime.seed)
    print()
    print(format_accumulation(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


def _info(args):
    from tf_effitrain.runtime import runtime_info

    for key, value in runtime_info(args.engine).items():
        print(f"{key:>10}: {value}")


def main(argv=None):
    """Entry point of the `tf-effitrain` command."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep C++ start-up chatter out.
    args = _build_parser().parse_args(argv)
    from tf_effitrain.config import ConfigError
    from tf_effitrain.data import DataError

    try:
        commands = {"train": _train, "evaluate": _evaluate, "bench": _bench, "info": _info}
        commands[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"tf-effitrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
