"""Precision policy: `auto` picks what the hardware computes fast, and says why.

`choose_precision` is the pure decision (tested with injected `Hardware`);
`set_precision` applies it to one Keras engine. Under every policy the toolkit keeps
softmax, normalization, the loss and the logits in float32 (see models/).
"""

from tf_effitrain.config.choices import PRECISIONS

__all__ = ["PRECISIONS", "choose_precision", "resolve_precision", "set_precision"]



def choose_precision(requested, hardware):
    """The dtype policy for `requested` on `hardware`, and the reason.

    `auto`: TPU -> `mixed_bfloat16`; GPUs all of compute capability >= 8.0 ->
    `mixed_bfloat16`; GPUs of capability 7.x -> `mixed_float16` (tensor cores; the loss is
    scaled); older GPUs -> `float32` (no fast low precision); a CPU with AVX-512 BF16 or
    AMX -> `mixed_bfloat16`; else `float32`.

    Args:
        requested: str. One of `PRECISIONS`.
        hardware: `Hardware`.

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
        return "mixed_bfloat16", f"CPU computes bfloat16 natively ({flags})"
    return "float32", "no TPU, GPU or bfloat16-capable CPU (avx512_bf16 / amx_bf16)"


def resolve_precision(requested, strategy=None):
    """`(policy, reason)` for `requested` on this machine (TPU cores from `strategy`)."""
    if requested != "auto":
        return choose_precision(requested, None)
    from tf_effitrain.runtime.distribute import is_tpu
    from tf_effitrain.runtime.hardware import detect_hardware

    return choose_precision(requested, detect_hardware(
        tpu_cores=strategy.num_replicas_in_sync if is_tpu(strategy) else 0))


def set_precision(requested="auto", keras=None, hardware=None, log=print):
    """Chooses and sets the global dtype policy of one engine.

    Args:
        requested: str. One of `PRECISIONS`.
        keras: the engine's `keras` module (default Keras 3).
        hardware: `Hardware` or None (detected).
        log: callable or None. Receives `precision: <policy> (<reason>)`.

    Returns:
        `(policy, reason)`.

    Example:

    ```python
    policy, reason = et.set_precision("auto")   # e.g. mixed_bfloat16 on a TPU
    model = et.build_transformer_classifier(cfg, 4000, 6, 128)  # logits stay float32
    ```
    """
    if hardware is None:
        policy, reason = resolve_precision(requested)
    else:
        policy, reason = choose_precision(requested, hardware)
    if keras is None:
        from tf_effitrain.engine import get_keras

        keras = get_keras("keras3")
    keras.mixed_precision.set_global_policy(policy)
    if log:
        log(f"precision: {policy} ({reason})")
    return policy, reason
