"""What the machine offers, as plain data, so that choices made from it can be tested."""

import dataclasses
from typing import Tuple

from tf_effitrain.runtime.info import cpu_flags

__all__ = ["Hardware", "detect_hardware"]


@dataclasses.dataclass(frozen=True)
class Hardware:
    """A description of the accelerators and CPU of one machine.

    Args:
        tpu_cores: int. TPU cores reachable (0 without a TPU).
        gpu_compute_capabilities: tuple of (major, minor). One entry per GPU.
        cpu_flags: frozenset of str. CPU feature flags (`avx512_bf16`, `amx_bf16`, ...).
    """

    tpu_cores: int = 0
    gpu_compute_capabilities: Tuple[Tuple[int, int], ...] = ()
    cpu_flags: frozenset = frozenset()

    @property
    def num_gpus(self):
        return len(self.gpu_compute_capabilities)

    @property
    def cpu_bf16(self):
        """The CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
        return bool(self.cpu_flags & {"avx512_bf16", "amx_bf16"})


def detect_hardware(tpu_cores=None):
    """Reads this machine's devices from TensorFlow and CPU flags from /proc/cpuinfo.

    Args:
        tpu_cores: int or None. TPU cores found by `resolve_strategy` (TPUs are only
            visible after connecting to them); None counts logical TPU devices.
    """
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        gpus.append(tuple(capability) if capability else (0, 0))
    if tpu_cores is None:
        tpu_cores = len(tf.config.list_logical_devices("TPU"))
    return Hardware(tpu_cores=tpu_cores, gpu_compute_capabilities=tuple(gpus),
                    cpu_flags=frozenset(cpu_flags()))
