"""tf_effitrain: fast, cheap Transformer training with TensorFlow/Keras.

    import tf_effitrain as et
    config = et.load_config("configs/demo_cpu.yaml", ["training.epochs=2"])
    result = et.train(config)

Public names load on first use (PEP 562), so `import tf_effitrain` does not import
TensorFlow. The toolkit's Keras classes are registered for `keras.models.load_model`
as soon as Keras 3 (or tf_keras) is imported, whichever comes first.
"""

from tf_effitrain import _registry
from tf_effitrain._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "tf_effitrain.errors",
    "DataError": "tf_effitrain.errors",
    "StrategyError": "tf_effitrain.errors",
    "TfEffitrainError": "tf_effitrain.errors",
    "RunDirError": "tf_effitrain.errors",
    "NonFiniteError": "tf_effitrain.errors",
    "TrainingInterrupted": "tf_effitrain.errors",
    "DataConfig": "tf_effitrain.config",
    "ExperimentConfig": "tf_effitrain.config",
    "ModelConfig": "tf_effitrain.config",
    "load_config": "tf_effitrain.config",
    "prepare_data": "tf_effitrain.data",
    "get_keras": "tf_effitrain.engine",
    "build_transformer_classifier": "tf_effitrain.models",
    "count_params": "tf_effitrain.models",
    "build_optimizer": "tf_effitrain.optim",
    "warmup_decay": "tf_effitrain.optim",
    "resolve_strategy": "tf_effitrain.runtime",
    "set_precision": "tf_effitrain.runtime",
    "accumulate": "tf_effitrain.training",
    "Checkpointing": "tf_effitrain.training",
    "run_status": "tf_effitrain.training",
    "default_callbacks": "tf_effitrain.training",
    "macro_f1": "tf_effitrain.training",
    "classification_metrics": "tf_effitrain.training",
    "evaluate_run": "tf_effitrain.training",
    "RunResult": "tf_effitrain.training",
    "TrainerPlugin": "tf_effitrain.training",
    "TextClassifier": "tf_effitrain.export",
    "export_run": "tf_effitrain.export",
    "export_tflite": "tf_effitrain.export",
    "train": "tf_effitrain.training",
    "distiller": "tf_effitrain.distill.distillation",
    "distillation_loss": "tf_effitrain.distill",
    "load_teacher": "tf_effitrain.distill",
    "prune_heads": "tf_effitrain.compress",
    "factorize": "tf_effitrain.compress",
    "compress_run": "tf_effitrain.compress",
    "prune": "tf_effitrain.compress",
    "strip": "tf_effitrain.compress",
    "quantize_aware": "tf_effitrain.compress",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

_registry.install_import_hooks()
