"""The `tf-effitrain bench` suites: one registry, one way to run and write each.

Every suite module has `run_suite(config, args, log)` (returns a JSON-serializable
dict; honours `args.quick`: the same pipeline on a tiny setting, under 2 minutes),
`format_result(result)` (Markdown) and `plot_result(result, path)` (PNG).
`run_bench` runs one and writes, into its own directory (`runs/bench/<suite>` by
default):

    result.json   the result, with the command, date, duration and CPU
    result.md     the command, then the Markdown table
    result.png    the plot

Performance claims are ratios measured within one run (the machine may be shared and
noisy); docs/benchmarks.md holds the latest figures with the command that made them.
"""

import datetime
import importlib
import json
import os
import shutil
import sys
import time

__all__ = ["SUITES", "run_bench", "write_outputs"]

# name -> (module, config used when none is given (None: the built-in defaults, i.e.
# the CPU demo's model), what it measures)
SUITES = {
    "recipe": ("tf_effitrain.bench.recipe", "configs/demo_cpu.yaml",
               "the toolkit's recipe vs a plain Keras 3 script on the same data: real "
               "tokens/s, padding, validation accuracy, 3 seeds"),
    "mfu": ("tf_effitrain.bench.mfu", None,
            "model FLOPs utilization against this machine's float32 / bfloat16 matmul "
            "peak, and where the step's time goes"),
    "data": ("tf_effitrain.bench.data", "configs/demo_cpu.yaml",
             "time to first step, peak RSS and input vs training tokens/s for 10K / 100K "
             "/ 1M examples; the vocabulary learners"),
    "accumulation": ("tf_effitrain.bench.accumulation", None,
                     "peak memory and speed of k micro-batches per update"),
    "precision": ("tf_effitrain.bench.precision", None,
                  "training speed of float32 / mixed_bfloat16 / mixed_float16"),
    "inference": ("tf_effitrain.bench.inference", None,
                  "batch-1 and batch-32 latency: Keras float32 / bfloat16 and TFLite "
                  "float32 / dynamic / float16 / int8"),
    "distill": ("tf_effitrain.bench.distill", None,
                "teacher vs distilled student vs the student from scratch, over seeds"),
    "compress": ("tf_effitrain.bench.compress", "configs/demo_cpu.yaml",
                 "accuracy vs latency of head/neuron removal and low-rank levels"),
    "pruning": ("tf_effitrain.bench.pruning", "configs/demo_cpu.yaml",
                "tfmot 50% / 80% / 2:4 pruning and QAT int8 vs the float model, file "
                "sizes"),
}


def _command(argv):
    return "tf-effitrain " + " ".join(argv) if argv else "tf-effitrain bench"


def write_outputs(what, result, out_dir, module=None):
    """Writes `result.json`, `result.md` and `result.png` into `out_dir`; returns paths."""
    module = module or importlib.import_module(SUITES[what][0])
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"result.{name}") for name in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    module.plot_result(result, paths["png"])
    header = f"# tf-effitrain bench {what}\n\n`{result['command']}` on {result['date']} " \
             f"({result['seconds']:.0f} s).\n\n"
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(header + module.format_result(result) + "\n\n![plot](result.png)\n")
    return paths


def run_bench(what, args, argv=None, log=print):
    """Runs suite `what` with the CLI arguments `args`; writes its outputs.

    Args:
        what: str. A key of `SUITES`.
        args: argparse namespace of `tf-effitrain bench` (`config`, `overrides`,
            `quick`, `out_dir`, `run_root` and the suite's own options).
        argv: list of str or None. The command line, recorded in the outputs.
        log: callable or None. Progress lines.

    Returns:
        `(result, paths)`.
    """
    from tf_effitrain.config import load_config

    module_name, default_config, _ = SUITES[what]
    module = importlib.import_module(module_name)
    args.out_dir = args.out_dir or os.path.join("runs", "bench", what)
    # Suites that train runs (recipe, distill, compress, pruning) write them here.
    args.run_root = getattr(args, "run_root", None) or os.path.join(args.out_dir, "runs")
    config = load_config(args.config or default_config, args.overrides)
    start = time.time()
    result = module.run_suite(config, args, log=log)
    result.update(command=_command(argv if argv is not None else sys.argv[1:]),
                  date=datetime.date.today().isoformat(), seconds=time.time() - start)
    result.setdefault("suite", what)
    paths = write_outputs(what, result, args.out_dir, module)
    if getattr(args, "out", None):
        shutil.copyfile(paths["json"], args.out)
    if getattr(args, "plot", None):
        shutil.copyfile(paths["png"], args.plot)
    return result, paths
