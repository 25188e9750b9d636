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

    from tf_effitrain.runtime.distribute import choose_strategy, cluster_spec, tpu_evidence
    from tf_effitrain.runtime.hardware import detect_hardware
    from tf_effitrain.runtime.precision import choose_precision

    keras = get_keras(engine)
    flags = cpu_flags()
    hardware = detect_hardware()
    policy, why_policy = choose_precision("auto", hardware)
    if hardware.cpu_bf16 and not (hardware.tpu_cores or hardware.num_gpus):
        from tf_effitrain.runtime.precision import CPU_BF16_MIN_D_MODEL

        # On a CPU `train` also weighs the model: narrower ones stay float32.
        why_policy += (f"; for models of d_model >= {CPU_BF16_MIN_D_MODEL}, float32 "
                       "below")
    # Without connecting to a TPU (that is `resolve_strategy`'s job): TPU hints only.
    kind, why_kind = choose_strategy("auto", hardware, cluster_spec())
    tpu = tpu_evidence()
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "engine": engine,
        "keras": keras.__version__,
        "devices": [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()],
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "tpu_hints": tpu or "none",
        "precision": f"auto -> {policy} ({why_policy})",
        "strategy": f"auto -> {kind} ({why_kind})" + (
            "; a TPU is hinted: `train` will try to connect" if tpu and kind != "tpu" else ""),
    }
