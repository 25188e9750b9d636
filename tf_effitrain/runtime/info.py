"""What this machine offers the toolkit: devices, CPU features, engine, policy, strategy."""

import platform

__all__ = ["cpu_flags", "runtime_info"]


def cpu_flags():
    """The CPU feature flags from /proc/cpuinfo (empty set where unavailable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runtime_info(engine="keras3"):
    """A dict describing versions, devices, CPU bf16 support, precision and strategy."""
    import tensorflow as tf

    from tf_effitrain.engine import get_keras

    keras = get_keras(engine)
    flags = cpu_flags()
    strategy = tf.distribute.get_strategy()
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "engine": engine,
        "keras": keras.__version__,
        "devices": [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()],
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "precision": keras.mixed_precision.global_policy().name,
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
    }
