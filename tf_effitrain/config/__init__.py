"""Experiment configuration: typed dataclasses, YAML loading, overrides, validation.

Pure Python (no TensorFlow): a config error is reported before anything heavy loads.
"""

from tf_effitrain.config import choices
from tf_effitrain.config.loader import (
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)
from tf_effitrain.config.schema import (
    CompressionConfig,
    ConfigError,
    DataConfig,
    DistillationConfig,
    ExperimentConfig,
    ExportConfig,
    ModelConfig,
    OptimizerConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "CompressionConfig",
    "ConfigError",
    "DataConfig",
    "DistillationConfig",
    "ExperimentConfig",
    "ExportConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "choices",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]
