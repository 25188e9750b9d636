"""tf_effitrain: fast, cheap Transformer training with TensorFlow/Keras.

    import tf_effitrain as et
    config = et.load_config("configs/demo_cpu.yaml", ["training.epochs=2"])
    result = et.train(config)
"""

from tf_effitrain.config import ConfigError, ExperimentConfig, load_config
from tf_effitrain.data import DataError, prepare_data
from tf_effitrain.engine import get_keras
from tf_effitrain.models import build_transformer_classifier, count_params
from tf_effitrain.optim import build_optimizer, warmup_decay
from tf_effitrain.runtime import resolve_strategy, set_precision
from tf_effitrain.training import accumulate, evaluate_run, train

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "accumulate",
    "build_optimizer",
    "build_transformer_classifier",
    "count_params",
    "evaluate_run",
    "get_keras",
    "load_config",
    "prepare_data",
    "resolve_strategy",
    "set_precision",
    "train",
    "warmup_decay",
]
