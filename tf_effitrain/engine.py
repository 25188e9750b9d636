"""Keras engine resolution: `keras3` (default) or `tf_keras` (what tfmot needs).

This is the one module that knows the two Keras APIs differ. Everything else receives
the engine's `keras` module from `get_keras()` and builds with it.
"""

import importlib

import tensorflow as tf

__all__ = [
    "ENGINES",
    "get_keras",
    "engine_name",
    "keras_of",
    "register_serializable",
    "next_learning_rate",
    "scalar",
    "training_loss",
    "scale_loss",
    "unscale_gradients",
    "update_metrics",
    "apply_update",
    "loss_scale_optimizer",
    "step_logs",
]

ENGINES = ("keras3", "tf_keras")
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


def training_loss(model, x, y, y_pred, sample_weight):
    """The compiled training loss of one (micro-)batch, also recorded in the loss metric.

    Keras 3's `compute_loss` leaves the `loss` metric to `train_step`; tf_keras'
    compiled loss updates it itself. Either way the metric receives the batch's mean
    loss weighted by its number of examples, so micro-batches add up to the full batch.
    Under a distribution strategy the returned loss is already divided by the number
    of replicas (both engines), ready for a summing all-reduce.
    """
    if engine_name(keras_of(model)) == "tf_keras":
        return model.compute_loss(x, y, y_pred, sample_weight)
    from keras.src.losses.loss import unscale_loss_for_distribution

    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                              training=True)
    batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
    model._loss_tracker.update_state(unscale_loss_for_distribution(loss),
                                     sample_weight=batch)
    return loss


def _is_tf_keras_loss_scale_optimizer(optimizer):
    return hasattr(optimizer, "get_scaled_loss") and hasattr(optimizer, "loss_scale")


def scale_loss(optimizer, loss):
    """`loss` times the dynamic loss scale when `optimizer` scales losses (float16)."""
    if optimizer is None:
        return loss
    if _is_tf_keras_loss_scale_optimizer(optimizer):
        return optimizer.get_scaled_loss(loss)
    return optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss


def unscale_gradients(optimizer, grads):
    """Gradients of a scaled loss, made ready for `optimizer.apply_gradients`.

    tf_keras' LossScaleOptimizer wants unscaled gradients (it then checks them for
    inf/NaN); Keras 3's unscales and checks inside `apply_gradients` itself.
    """
    if _is_tf_keras_loss_scale_optimizer(optimizer):
        return optimizer.get_unscaled_gradients(grads)
    return grads


def update_metrics(model, y, y_pred, sample_weight):
    """Updates the compiled metrics' state (no result read: that syncs replicas)."""
    if engine_name(keras_of(model)) == "tf_keras":
        model.compiled_metrics.update_state(y, y_pred, sample_weight)
    elif model._compile_metrics is not None:
        model._compile_metrics.update_state(y, y_pred, sample_weight=sample_weight)


def loss_scale_optimizer(optimizer, initial_scale=2.0**15):
    """Wraps `optimizer` in its engine's dynamic LossScaleOptimizer (for float16)."""
    keras = keras_of(optimizer)
    if engine_name(keras) == "tf_keras":
        return keras.mixed_precision.LossScaleOptimizer(optimizer,
                                                        initial_scale=initial_scale)
    return keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=initial_scale)


def apply_update(optimizer, grads_and_vars):
    """`optimizer.apply_gradients`, with global-norm clipping of the *global* gradient.

    Under a multi-replica strategy Keras 3 clips each replica's partial gradient before
    the cross-replica sum (`base_optimizer.apply` clips, `_backend_update_step` then
    all-reduces), which is not the large-batch update. There, the global norm is
    computed here from the all-reduced gradients, each replica's gradients are scaled
    by the same factor, and Keras' own clipping is off for this call. tf_keras sums
    first and clips after: it needs nothing.
    """
    grads_and_vars = list(grads_and_vars)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    clipnorm = getattr(inner, "global_clipnorm", None)
    context = tf.distribute.get_replica_context()
    if (engine_name(keras_of(optimizer)) == "tf_keras" or not clipnorm or context is None
            or tf.distribute.get_strategy().num_replicas_in_sync == 1):
        return optimizer.apply_gradients(grads_and_vars)
    grads = [g for g, _ in grads_and_vars]
    norm = tf.linalg.global_norm(context.all_reduce(tf.distribute.ReduceOp.SUM, grads))
    if inner is not optimizer:  # a LossScaleOptimizer: these gradients are scaled
        norm = norm / tf.cast(optimizer.scale_loss(tf.constant(1.0)), norm.dtype)
    # A non-finite norm gives a factor of 0 (or NaN): the loss-scale optimizer, if any,
    # then sees non-finite gradients and skips the update.
    factor = tf.minimum(1.0, clipnorm / norm)
    grads_and_vars = [(g * tf.cast(factor, g.dtype), v) for g, v in grads_and_vars]
    inner.global_clipnorm = None  # read while tracing: off for this apply only
    try:
        return optimizer.apply_gradients(grads_and_vars)
    finally:
        inner.global_clipnorm = clipnorm


def step_logs(model, logs):
    """A train/test step's logs in the form the engine can reduce across workers.

    Keras 3 reduces step outputs under a multi-worker MultiWorkerMirroredStrategy with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalar metrics ("Invalid
    reduction dimension 0 for input with 0 dimensions", tensorflow#72388). Shaped [1],
    the same reduce returns the cross-worker mean as a scalar.
    """
    # Imported here: the runtime package imports this module.
    from tf_effitrain.runtime.distribute import is_multi_worker

    if engine_name(keras_of(model)) == "tf_keras" or not is_multi_worker(
            tf.distribute.get_strategy()):
        return logs
    return {k: tf.reshape(v, [1]) for k, v in logs.items()}
