"""Keras engine resolution: `keras3` (default) or `tf_keras` (what tfmot needs).

This is the one module that knows the two Keras APIs differ. Everything else receives
the engine's `keras` module from `get_keras()` and builds with it; code that must act
differently per engine asks once for the engine's `EngineOps` (`ops_for(keras)` or
`ops_of(obj)`) and calls its methods. This module sits at the bottom of the package: it
imports nothing from it but the choice list and the class-registration hook.
"""

import importlib

import tensorflow as tf

from tf_effitrain import _registry
from tf_effitrain.config.choices import ENGINES

__all__ = [
    "ENGINES",
    "EngineOps",
    "get_keras",
    "engine_name",
    "keras_of",
    "ops_for",
    "ops_of",
    "register_serializable",
    "next_learning_rate",
    "scalar",
    "is_multi_worker",
]

_MODULES = {"keras3": "keras", "tf_keras": "tf_keras"}


def get_keras(engine="keras3"):
    """Returns the `keras` module of `engine` (`"keras3"` or `"tf_keras"`)."""
    if engine not in _MODULES:
        raise ValueError(
            f"`engine` must be one of {ENGINES}. Received: engine={engine!r}"
        )
    return importlib.import_module(_MODULES[engine])


def engine_name(keras):
    """The engine name of a `keras` module: `"keras3"` or `"tf_keras"`."""
    return "tf_keras" if keras.__name__.split(".")[0] == "tf_keras" else "keras3"


def keras_of(obj):
    """The `keras` module (Keras 3 or tf_keras) that `obj`'s class comes from."""
    for cls in type(obj).__mro__:
        if cls.__module__.split(".")[0] == "tf_keras":
            return get_keras("tf_keras")
    return get_keras("keras3")


def register_serializable(keras, package="tf_effitrain"):
    """The engine's `register_keras_serializable` decorator."""
    return keras.saving.register_keras_serializable(package=package)


def scalar(value):
    """A Python number from a scalar tensor or variable of either engine.

    `int()`/`float()` fail on distributed (Mirrored) variables; reading through a tensor
    works for all of them.
    """
    return tf.convert_to_tensor(value).numpy().item()


def next_learning_rate(optimizer):
    """The learning rate the optimizer's next update will use, as a Python float.

    The engines disagree on `optimizer.learning_rate` under a schedule: Keras 3 returns
    `schedule(iterations)` (the next update's rate), tf_keras the rate of the last
    update. Evaluating the schedule here gives one meaning in both.
    """
    lr = getattr(optimizer, "_learning_rate", None)
    if callable(lr) and not hasattr(lr, "numpy"):
        return float(scalar(lr(optimizer.iterations)))
    return float(scalar(optimizer.learning_rate))


def is_multi_worker(strategy):
    """A MultiWorkerMirroredStrategy that really spans several workers."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode())


class EngineOps:
    """What a custom `train_step` does differently in each engine.

    One instance per engine (`ops_for(keras)`); the methods take the objects of that
    engine. Subclasses: `_Keras3Ops`, `_TFKerasOps`.

    Attributes:
        name: str. `"keras3"` or `"tf_keras"`.
        keras: the engine's `keras` module.
    """

    name = None

    def __init__(self, keras):
        self.keras = keras

    def training_loss(self, model, x, y, y_pred, sample_weight):
        """The compiled training loss of one (micro-)batch, also recorded in the `loss`
        metric weighted by the batch's number of examples (so micro-batches add up to
        the full batch). Under a distribution strategy the returned loss is already
        divided by the number of replicas, ready for a summing all-reduce."""
        raise NotImplementedError

    def scale_loss(self, optimizer, loss):
        """`loss` times the dynamic loss scale when `optimizer` scales losses (float16)."""
        raise NotImplementedError

    def unscale_gradients(self, optimizer, grads):
        """Gradients of a scaled loss, made ready for `optimizer.apply_gradients`."""
        return grads

    def loss_scale(self, optimizer):
        """The current dynamic loss scale (1.0 without loss scaling), a float tensor."""
        raise NotImplementedError

    def update_metrics(self, model, y, y_pred, sample_weight):
        """Updates the compiled metrics' state (no result read: that syncs replicas)."""
        raise NotImplementedError

    def apply_update(self, optimizer, grads_and_vars):
        """`optimizer.apply_gradients`, clipping by the norm of the *global* gradient."""
        return optimizer.apply_gradients(list(grads_and_vars))

    def step_logs(self, logs):
        """A step's logs in the form `fit` can reduce across workers."""
        return logs

    def loss_scale_optimizer(self, optimizer, initial_scale=2.0**15):
        """Wraps `optimizer` in the engine's dynamic LossScaleOptimizer (float16)."""
        raise NotImplementedError

    def batch_norm_kwargs(self):
        """Extra `BatchNormalization` arguments (the `fused` flag where it exists)."""
        return {}

    def export_saved_model(self, model, path, input_signature, output_name="logits"):
        """Writes `model` as a TF SavedModel with one `serving_default` signature.

        Args:
            model: a model of this engine.
            path: str. The SavedModel directory.
            input_signature: list of `tf.TensorSpec` (named: the names become the
                signature's input names).
            output_name: str. The name of the (single) output.
        """
        raise NotImplementedError


class _Keras3Ops(EngineOps):
    name = "keras3"

    def training_loss(self, model, x, y, y_pred, sample_weight):
        # Keras 3's `compute_loss` leaves the `loss` metric to `train_step`.
        from keras.src.losses.loss import unscale_loss_for_distribution

        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                  training=True)
        batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        model._loss_tracker.update_state(unscale_loss_for_distribution(loss),
                                         sample_weight=batch)
        return loss

    def scale_loss(self, optimizer, loss):
        if optimizer is None or not hasattr(optimizer, "scale_loss"):
            return loss
        return optimizer.scale_loss(loss)

    def loss_scale(self, optimizer):
        if hasattr(optimizer, "inner_optimizer"):
            return tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float32)
        return tf.constant(1.0)

    def update_metrics(self, model, y, y_pred, sample_weight):
        if model._compile_metrics is not None:
            model._compile_metrics.update_state(y, y_pred, sample_weight=sample_weight)

    def apply_update(self, optimizer, grads_and_vars):
        # Under a multi-replica strategy Keras 3 clips each replica's partial gradient
        # before the cross-replica sum (`base_optimizer.apply` clips,
        # `_backend_update_step` then all-reduces), which is not the large-batch update.
        # There the global norm is computed here from the all-reduced gradients, every
        # replica scales by the same factor, and Keras' own clipping is off for this
        # call.
        grads_and_vars = list(grads_and_vars)
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        clipnorm = getattr(inner, "global_clipnorm", None)
        context = tf.distribute.get_replica_context()
        if (not clipnorm or context is None
                or tf.distribute.get_strategy().num_replicas_in_sync == 1):
            return optimizer.apply_gradients(grads_and_vars)
        grads = [g for g, _ in grads_and_vars]
        norm = tf.linalg.global_norm(context.all_reduce(tf.distribute.ReduceOp.SUM, grads))
        norm = norm / tf.cast(self.loss_scale(optimizer), norm.dtype)
        # A non-finite norm gives a factor of 0 (or NaN): the loss-scale optimizer, if
        # any, then sees non-finite gradients and skips the update.
        factor = tf.minimum(1.0, clipnorm / norm)
        grads_and_vars = [(g * tf.cast(factor, g.dtype), v) for g, v in grads_and_vars]
        inner.global_clipnorm = None  # read while tracing: off for this apply only
        try:
            return optimizer.apply_gradients(grads_and_vars)
        finally:
            inner.global_clipnorm = clipnorm

    def step_logs(self, logs):
        # Keras 3 reduces step outputs under a multi-worker strategy with
        # `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars ("Invalid
        # reduction dimension 0 for input with 0 dimensions", tensorflow#72388). Shaped
        # [1], the same reduce returns the cross-worker mean as a scalar.
        if not is_multi_worker(tf.distribute.get_strategy()):
            return logs
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    def loss_scale_optimizer(self, optimizer, initial_scale=2.0**15):
        return self.keras.optimizers.LossScaleOptimizer(optimizer,
                                                         initial_scale=initial_scale)

    def export_saved_model(self, model, path, input_signature, output_name="logits"):
        # Keras 3 variables are not `tf.Module`-tracked: a plain `tf.saved_model.save`
        # of a wrapper would leave them out (the TFLite file then fails at
        # READ_VARIABLE). The ExportArchive tracks them (the converter freezes them).
        archive = self.keras.export.ExportArchive()
        archive.track(model)

        def serve(*inputs):
            return {output_name: model(list(inputs) if len(inputs) > 1 else inputs[0],
                                       training=False)}

        archive.add_endpoint("serving_default", serve, input_signature=input_signature)
        archive.write_out(path, verbose=False)


class _TFKerasOps(EngineOps):
    name = "tf_keras"

    def training_loss(self, model, x, y, y_pred, sample_weight):
        # tf_keras' compiled loss updates the `loss` metric itself.
        return model.compute_loss(x, y, y_pred, sample_weight)

    @staticmethod
    def _scales(optimizer):
        return hasattr(optimizer, "get_scaled_loss") and hasattr(optimizer, "loss_scale")

    def scale_loss(self, optimizer, loss):
        return optimizer.get_scaled_loss(loss) if self._scales(optimizer) else loss

    def unscale_gradients(self, optimizer, grads):
        # tf_keras' LossScaleOptimizer wants unscaled gradients (it then checks them for
        # inf/NaN); Keras 3's unscales inside `apply_gradients` itself.
        return optimizer.get_unscaled_gradients(grads) if self._scales(optimizer) else grads

    def loss_scale(self, optimizer):
        if self._scales(optimizer):
            return tf.cast(optimizer.loss_scale, tf.float32)
        return tf.constant(1.0)

    def update_metrics(self, model, y, y_pred, sample_weight):
        model.compiled_metrics.update_state(y, y_pred, sample_weight)

    # apply_update: tf_keras sums replicas' gradients first and clips after.

    def loss_scale_optimizer(self, optimizer, initial_scale=2.0**15):
        return self.keras.mixed_precision.LossScaleOptimizer(optimizer,
                                                             initial_scale=initial_scale)

    def batch_norm_kwargs(self):
        # tf_keras only honours `mask` (moments over real tokens) on the unfused path.
        return {"fused": False}

    def export_saved_model(self, model, path, input_signature, output_name="logits"):
        module = tf.Module()
        module.model = model  # tf_keras variables are tf.Variables: tracked

        @tf.function(input_signature=input_signature)
        def serve(*inputs):
            return {output_name: model(list(inputs) if len(inputs) > 1 else inputs[0],
                                       training=False)}

        tf.saved_model.save(module, path, signatures={"serving_default": serve})


_OPS = {}


def ops_for(keras):
    """The `EngineOps` of a `keras` module (one instance per engine)."""
    name = engine_name(keras)
    if name not in _OPS:
        _OPS[name] = (_TFKerasOps if name == "tf_keras" else _Keras3Ops)(keras)
    return _OPS[name]


def ops_of(obj):
    """The `EngineOps` of the engine `obj` (a model, layer or optimizer) belongs to."""
    return ops_for(keras_of(obj))


# Defines serializable classes: register them if an engine was imported meanwhile.
_registry.retry(__name__)
