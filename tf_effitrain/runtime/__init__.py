"""Runtime: hardware facts, precision policy, distribution strategy, TPU readiness.

Names load on first use: choosing a strategy or a precision from injected hardware
facts needs no TensorFlow.
"""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "STRATEGIES": "tf_effitrain.config.choices",
    "PRECISIONS": "tf_effitrain.config.choices",
    "StrategyError": "tf_effitrain.errors",
    "choose_strategy": "tf_effitrain.runtime.distribute",
    "cluster_spec": "tf_effitrain.runtime.distribute",
    "is_chief": "tf_effitrain.runtime.distribute",
    "is_multi_worker": "tf_effitrain.runtime.distribute",
    "is_tpu": "tf_effitrain.runtime.distribute",
    "resolve_strategy": "tf_effitrain.runtime.distribute",
    "strategy_name": "tf_effitrain.runtime.distribute",
    "tpu_evidence": "tf_effitrain.runtime.distribute",
    "Hardware": "tf_effitrain.runtime.hardware",
    "detect_hardware": "tf_effitrain.runtime.hardware",
    "cpu_flags": "tf_effitrain.runtime.info",
    "runtime_info": "tf_effitrain.runtime.info",
    "choose_precision": "tf_effitrain.runtime.precision",
    "resolve_precision": "tf_effitrain.runtime.precision",
    "set_precision": "tf_effitrain.runtime.precision",
    "check_tpu_readiness": "tf_effitrain.runtime.tpu_check",
    "is_tpu_node": "tf_effitrain.runtime.tpu_check",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
