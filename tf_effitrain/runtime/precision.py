"""Precision policy: `auto` picks what the hardware computes fast, and says why.

`choose_precision` is the pure decision (tested with injected `Hardware`);
`set_precision` applies it to one Keras engine. Under every policy the toolkit keeps
softmax, normalization, the loss and the logits in float32 (see models/).
"""

from tf_effitrain.config.choices import PRECISIONS

__all__ = ["PRECISIONS", "CPU_BF16_MIN_D_MODEL", "choose_precision", "resolve_precision",
           "set_precision"]

# On a CPU, bfloat16 training pays off only once the matmuls dominate the step: measured
# with `tf-effitrain bench precision` / `bench recipe` on 2-core AMD EPYC CPUs with
# avx512_bf16 (Zen 4 and Zen 5), d_model 128 ran at 0.99x of float32 on full batches
# and slower on the packed demo's smaller ones (the casts cost what the faster matmuls
# save), d_model 256 at 1.19x-1.3x. See docs/benchmarks.md.
CPU_BF16_MIN_D_MODEL = 256


def choose_precision(requested, hardware, model_cfg=None):
    """The dtype policy for `requested` on `hardware`, and the reason.

    `auto`: TPU -> `mixed_bfloat16`; GPUs all of compute capability >= 8.0 ->
    `mixed_bfloat16`; GPUs of capability 7.x -> `mixed_float16` (tensor cores; the loss is
    scaled); older GPUs -> `float32` (no fast low precision); a CPU with AVX-512 BF16 or
    AMX -> `mixed_bfloat16`, unless the model is too narrow for it to pay off
    (`d_model < CPU_BF16_MIN_D_MODEL`, when `model_cfg` is given: `float32`); else
    `float32`.

    Args:
        requested: str. One of `PRECISIONS`.
        hardware: `Hardware`.
        model_cfg: `ModelConfig` or None. The model to train (its width decides on CPUs).

    Returns:
        `(policy, reason)`, both str.
    """
    if requested not in PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {PRECISIONS}. Received: precision={requested!r}")
    if requested != "auto":
        return requested, "requested"
    if hardware.tpu_cores:
        return "mixed_bfloat16", f"TPU ({hardware.tpu_cores} cores) computes bfloat16 natively"
    if hardware.num_gpus:
        oldest = min(hardware.gpu_compute_capabilities)
        cc = f"{oldest[0]}.{oldest[1]}"
        if oldest >= (8, 0):
            return "mixed_bfloat16", f"GPU compute capability {cc} >= 8.0 computes bfloat16"
        if oldest >= (7, 0):
            return "mixed_float16", (f"GPU compute capability {cc} < 8.0: float16 tensor "
                                     "cores, with loss scaling")
        return "float32", f"GPU compute capability {cc} < 7.0 has no fast float16"
    if hardware.cpu_bf16:
        flags = ", ".join(sorted(hardware.cpu_flags & {"avx512_bf16", "amx_bf16"}))
        width = getattr(model_cfg, "d_model", None)
        if width is not None and width < CPU_BF16_MIN_D_MODEL:
            return "float32", (
                f"CPU computes bfloat16 natively ({flags}), but at d_model {width} < "
                f"{CPU_BF16_MIN_D_MODEL} its casts cost what the faster matmuls save "
                "(tf-effitrain bench precision)")
        return "mixed_bfloat16", f"CPU computes bfloat16 natively ({flags})"
    return "float32", "no TPU, GPU or bfloat16-capable CPU (avx512_bf16 / amx_bf16)"


def resolve_precision(requested, strategy=None, model_cfg=None):
    """`(policy, reason)` for `requested` on this machine (TPU cores from `strategy`)
    and, on CPUs, for the model of `model_cfg` (see `choose_precision`)."""
    if requested != "auto":
        return choose_precision(requested, None)
    from tf_effitrain.runtime.distribute import is_tpu
    from tf_effitrain.runtime.hardware import detect_hardware

    return choose_precision(requested, detect_hardware(
        tpu_cores=strategy.num_replicas_in_sync if is_tpu(strategy) else 0), model_cfg)


def set_precision(requested="auto", keras=None, hardware=None, log=print, model_cfg=None):
    """Chooses and sets the global dtype policy of one engine.

    Args:
        requested: str. One of `PRECISIONS`.
        keras: the engine's `keras` module (default Keras 3).
        hardware: `Hardware` or None (detected).
        log: callable or None. Receives `precision: <policy> (<reason>)`.
        model_cfg: `ModelConfig` or None. The model to train (see `choose_precision`).

    Returns:
        `(policy, reason)`.

    Example:

    ```python
    policy, reason = et.set_precision("auto")   # e.g. mixed_bfloat16 on a TPU
    model = et.build_transformer_classifier(cfg, 4000, 6, 128)  # logits stay float32
    ```
    """
    if hardware is None:
        policy, reason = resolve_precision(requested, model_cfg=model_cfg)
    else:
        policy, reason = choose_precision(requested, hardware, model_cfg)
    if keras is None:
        from tf_effitrain.engine import get_keras

        keras = get_keras("keras3")
    keras.mixed_precision.set_global_policy(policy)
    if log:
        log(f"precision: {policy} ({reason})")
    return policy, reason
