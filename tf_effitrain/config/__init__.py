"""Experiment configuration: typed dataclasses, YAML loading, overrides, validation."""

from tf_effitrain.config.loader import (
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)
from tf_effitrain.config.schema import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]
