"""Runtime: hardware facts, precision policy, distribution strategy, TPU readiness."""

from tf_effitrain.runtime.distribute import (
    STRATEGIES,
    StrategyError,
    choose_strategy,
    cluster_spec,
    is_chief,
    is_multi_worker,
    is_tpu,
    resolve_strategy,
    tpu_evidence,
)
from tf_effitrain.runtime.hardware import Hardware, detect_hardware
from tf_effitrain.runtime.info import cpu_flags, runtime_info
from tf_effitrain.runtime.precision import (
    PRECISIONS,
    choose_precision,
    resolve_precision,
    set_precision,
)
from tf_effitrain.runtime.tpu_check import check_tpu_readiness, is_tpu_node

__all__ = [
    "PRECISIONS",
    "STRATEGIES",
    "Hardware",
    "StrategyError",
    "check_tpu_readiness",
    "choose_precision",
    "choose_strategy",
    "cluster_spec",
    "cpu_flags",
    "detect_hardware",
    "is_chief",
    "is_multi_worker",
    "is_tpu",
    "is_tpu_node",
    "resolve_precision",
    "resolve_strategy",
    "runtime_info",
    "set_precision",
    "tpu_evidence",
]
