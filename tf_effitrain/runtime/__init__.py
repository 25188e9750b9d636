"""Runtime facts: devices, CPU features, precision policy and strategy in use."""

from tf_effitrain.runtime.info import cpu_flags, runtime_info

__all__ = ["cpu_flags", "runtime_info"]
