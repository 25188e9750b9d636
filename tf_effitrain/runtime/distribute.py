"""Distribution strategy: `auto` finds a TPU, several GPUs or a TF_CONFIG cluster.

`choose_strategy` is the pure decision (tested with injected hardware and TF_CONFIG);
`resolve_strategy` connects to a TPU when there is evidence of one, builds the strategy
and logs it. Create the strategy before any other TensorFlow work in the process:
MultiWorkerMirroredStrategy and TPU initialisation require it.
"""

import glob
import json
import os

__all__ = [
    "STRATEGIES",
    "StrategyError",
    "choose_strategy",
    "cluster_spec",
    "is_chief",
    "is_multi_worker",
    "is_tpu",
    "resolve_strategy",
    "strategy_name",
    "tpu_evidence",
]

from tf_effitrain.config.choices import STRATEGIES
from tf_effitrain.errors import StrategyError
# Set by Colab (TPU node runtimes), Cloud TPU VMs and the TPU VM images.
_TPU_ENV = ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")


def cluster_spec(environ=None):
    """The `TF_CONFIG` of `environ` as a dict (empty when unset)."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise StrategyError(f"TF_CONFIG is not valid JSON: {e}") from None


def _num_tasks(tf_config):
    cluster = tf_config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def is_chief(tf_config):
    """Whether this process writes the run's files: the chief, or worker 0 without one."""
    task = tf_config.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    has_chief = bool(tf_config.get("cluster", {}).get("chief"))
    return task.get("type") == "worker" and task.get("index", 0) == 0 and not has_chief


def is_multi_worker(strategy):
    """A MultiWorkerMirroredStrategy that really spans several workers."""
    from tf_effitrain.engine import is_multi_worker as check

    return check(strategy)


def is_tpu(strategy):
    """A TPUStrategy."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.TPUStrategy)


def tpu_evidence(environ=None, devices=None):
    """Reasons to believe a TPU is attached (TPU env variables, /dev/accel*, /dev/vfio)."""
    environ = os.environ if environ is None else environ
    found = [name for name in _TPU_ENV if environ.get(name)]
    if devices is None:
        devices = glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")
    return found + list(devices)


def choose_strategy(requested, hardware, tf_config=None):
    """The strategy kind for `requested` on `hardware` under `tf_config`, and the reason.

    `auto`: a TF_CONFIG cluster of several tasks -> `multi_worker`; a TPU -> `tpu`;
    several GPUs -> `mirrored`; one GPU -> `one_device`; else `default`.

    Returns:
        `(kind, reason)`, both str.
    """
    if requested not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {STRATEGIES}. Received: strategy={requested!r}")
    if requested != "auto":
        return requested, "requested"
    tasks = _num_tasks(tf_config or {})
    if tasks > 1:
        return "multi_worker", f"TF_CONFIG describes a cluster of {tasks} workers"
    if hardware.tpu_cores:
        return "tpu", f"TPU with {hardware.tpu_cores} cores"
    if hardware.num_gpus > 1:
        return "mirrored", f"{hardware.num_gpus} GPUs"
    if hardware.num_gpus == 1:
        return "one_device", "one GPU"
    return "default", "no accelerator: one CPU device"


def _connect_tpu(tpu_address):
    import tensorflow as tf

    attempts = [{"tpu": tpu_address}] if tpu_address else [{"tpu": "local"}, {}]
    errors = []
    for kwargs in attempts:  # TPU VM first, then a TPU node (older Colab runtimes)
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(**kwargs)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return resolver
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            errors.append(f"TPUClusterResolver({kwargs}): {' '.join(str(e).split())}")
    raise StrategyError("Could not connect to a TPU: " + "; ".join(errors))


def strategy_name(strategy):
    """The public name of a strategy with its replica count, e.g. `MirroredStrategy x2`."""
    import tensorflow as tf

    public = ("MultiWorkerMirroredStrategy", "MirroredStrategy", "TPUStrategy",
              "OneDeviceStrategy")
    name = next((n for n in public if isinstance(strategy, getattr(tf.distribute, n))),
                "default")
    return f"{name} x{strategy.num_replicas_in_sync}"


def resolve_strategy(requested="auto", tpu_address=None, log=print, environ=None):
    """Builds the `tf.distribute` strategy for `requested`.

    Args:
        requested: str. One of `STRATEGIES`.
        tpu_address: str or None. TPU name or address for `TPUClusterResolver`; None tries
            `"local"` (TPU VM) and then the environment (TPU node).
        log: callable or None. Receives `strategy: <name> x<replicas> (<reason>)`.
        environ: mapping or None. Environment to read TF_CONFIG and TPU hints from.

    Returns:
        A `tf.distribute.Strategy`.

    Example:

    ```python
    strategy = et.resolve_strategy("auto")  # first, before other TensorFlow work
    with strategy.scope():
        model = et.build_transformer_classifier(cfg, 4000, 6, 128)
    ```
    """
    import tensorflow as tf

    from tf_effitrain.runtime.hardware import detect_hardware

    tf_config = cluster_spec(environ)
    resolver = None
    evidence = tpu_evidence(environ)
    if requested == "tpu" or (requested == "auto" and evidence
                              and _num_tasks(tf_config) <= 1):
        if requested == "tpu" and not evidence and not tpu_address:
            raise StrategyError(
                "`runtime.strategy: tpu` but no TPU is attached (no TPU environment "
                "variables, no /dev/accel* or /dev/vfio devices). Use a TPU runtime or "
                "`runtime.strategy: auto`.")
        try:
            resolver = _connect_tpu(tpu_address)
        except StrategyError as e:
            # A TPU is there but unusable: training a large model on the CPU instead
            # would be a silent, hours-long surprise.
            raise StrategyError(
                f"A TPU is attached ({', '.join(map(str, evidence)) or tpu_address}) but "
                f"connecting to it failed: {e}. Fix: restart the runtime (Colab: Runtime "
                "> Restart session) so that no other process holds the TPU, and create "
                "the strategy before any other TensorFlow work; or set "
                "`runtime.tpu_address`; or train on the CPU on purpose with "
                "`runtime.strategy: default`.") from None
    cores = resolver.num_accelerators().get("TPU", 0) if resolver is not None else 0
    hardware = detect_hardware(tpu_cores=cores)
    kind, reason = choose_strategy(requested, hardware, tf_config)
    if kind == "tpu":
        strategy = tf.distribute.TPUStrategy(resolver)
    elif kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif kind == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if hardware.num_gpus else "/cpu:0")
    else:
        strategy = tf.distribute.get_strategy()
    if log:
        log(f"strategy: {strategy_name(strategy)} ({reason})")
    return strategy
