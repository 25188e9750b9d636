"""Knowledge distillation: the `Distiller` (an accumulator subclass), its losses, and a
finished run as teacher. Imported lazily (PEP 562)."""

from tf_effitrain._lazy import lazy_exports

_EXPORTS = {
    "TEACHER_LOGITS": "tf_effitrain.distill.distillation",
    "distiller": "tf_effitrain.distill.distillation",
    "distiller_class": "tf_effitrain.distill.distillation",
    "distillation_loss": "tf_effitrain.distill.losses",
    "hidden_state_mse": "tf_effitrain.distill.losses",
    "soft_target_kl": "tf_effitrain.distill.losses",
    "weighted_mean": "tf_effitrain.distill.losses",
    "check_teacher_run": "tf_effitrain.distill.teacher",
    "load_teacher": "tf_effitrain.distill.teacher",
    "teacher_logits": "tf_effitrain.distill.teacher",
    "DistillationPlugin": "tf_effitrain.distill.plugin",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
