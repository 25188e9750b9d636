"""Gradient accumulation by micro-batching inside one `train_step`.

The step receives the effective batch, splits it into `k` micro-batches, runs forward
and backward on each in a `tf.while_loop` (one micro-batch's activations alive at a
time), sums float32 gradients weighted by micro-batch size, and applies them once. So:

- one update equals one update on the whole batch (mean loss over all its examples),
  whatever the micro-batch sizes, with sample weights, weight decay and clipping;
- there is no conditional around a synchronization point: the only cross-replica
  reduction is the one `apply_gradients` always does, so MirroredStrategy,
  MultiWorkerMirroredStrategy and TPUStrategy work (Keras 3's optimizer-level
  `gradient_accumulation_steps` crashes under MirroredStrategy: keras#20582);
- `optimizer.iterations`, and with it learning-rate schedules and EMA, advance once per
  applied update; so do tfmot pruning steps (reset per micro-batch, see below);
- metrics and the loss see every example once per step: the progress bar is per
  effective batch.

BatchNormalization inside the model normalizes each micro-batch with that micro-batch's
statistics and updates its moving averages once per micro-batch (k times per step):
the update equals the sum of the micro-batches' gradients, not the large batch's.
"""

import functools

import tensorflow as tf

from tf_effitrain.engine import (
    apply_update,
    engine_name,
    keras_of,
    register_serializable,
    scale_loss,
    step_logs,
    training_loss,
    unscale_gradients,
    update_metrics,
)

__all__ = ["micro_batch_bounds", "accumulator_class", "accumulate"]


def micro_batch_bounds(batch_size, accumulation_steps):
    """Boundaries of `min(accumulation_steps, batch_size)` balanced micro-batches.

    Args:
        batch_size: int or scalar int32 tensor. Examples in the effective batch.
        accumulation_steps: int >= 1.

    Returns:
        `(num, bounds)`: micro-batch `j` is `[bounds[j], bounds[j + 1])`. Sizes differ by
        at most one and none is empty; `num` and `bounds` are Python ints when
        `batch_size` is, else int32 tensors.
    """
    k = accumulation_steps
    if isinstance(batch_size, int):
        num = max(min(k, batch_size), 1)
        return num, [j * batch_size // num for j in range(num + 1)]
    num = tf.maximum(tf.minimum(tf.constant(k, tf.int32), batch_size), 1)
    return num, (tf.range(num + 1) * batch_size) // num


def _check_steps(accumulation_steps):
    if (not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool)
            or accumulation_steps < 1):
        raise ValueError(
            "`accumulation_steps` must be an integer >= 1. "
            f"Received: accumulation_steps={accumulation_steps!r}"
        )


def _take(structure, start, size):
    """Rows `[start, start + size)` of every tensor in `structure` (None stays None)."""

    def take(t):
        if t is None:
            return None
        t = tf.convert_to_tensor(t)
        return tf.slice(t, [start] + [0] * (t.shape.rank - 1),
                        [size] + [-1] * (t.shape.rank - 1))

    return tf.nest.map_structure(take, structure)


def _pruning_steps(model):
    """The `pruning_step` variables of tfmot pruning wrappers anywhere in `model`."""
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        step = getattr(layer, "pruning_step", None)
        if isinstance(step, tf.Variable):
            found.append(step)
        stack.extend(getattr(layer, "layers", []) or [])
    return found


@functools.lru_cache(maxsize=None)
def accumulator_class(keras):
    """The `GradientAccumulator` Model class for one engine."""

    @register_serializable(keras)
    class GradientAccumulator(keras.Model):
        """Trains `model` with gradients accumulated over micro-batches of each batch.

        Feed it batches of the *effective* size (micro-batch size x
        `accumulation_steps`); each training step splits the batch, accumulates, and
        applies one optimizer update. Inference and evaluation run `model` unchanged.
        Compile and fit this wrapper; save `wrapper.model` to ship the plain model.

        Args:
            model: Model. The model to train (any Keras model of the same engine).
            accumulation_steps: int. Micro-batches per update (`k >= 1`). A batch with
                fewer than `k` examples is split into one micro-batch per example.

        Example:

        ```python
        model = et.accumulate(build_model(), steps=8)   # effective batch 8 x 32
        model.compile(optimizer=..., loss=..., metrics=[...])
        model.fit(ds.batch(256))
        model.model.save("model.keras")
        ```
        """

        def __init__(self, model, accumulation_steps=1, **kwargs):
            _check_steps(accumulation_steps)
            super().__init__(**kwargs)
            self.model = model
            self.accumulation_steps = accumulation_steps

        def call(self, inputs, training=None):
            return self.model(inputs, training=training)

        def _micro_step(self, x, y, sample_weight, fraction, variables, pruning_steps):
            """Scaled gradients of one micro-batch's loss, weighted by its share."""
            iterations = tf.cast(self.optimizer.iterations, tf.int64)
            for step in pruning_steps:
                # tfmot advances `pruning_step` on every training call; pin it to the
                # update count so masks follow the schedule per update, not per
                # micro-batch.
                step.assign(tf.cast(iterations, step.dtype))
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = training_loss(self, x, y, y_pred, sample_weight)
                # Keras' mean over a micro-batch of n_j examples, times n_j / n, summed
                # over micro-batches, is the mean over the whole batch.
                loss = scale_loss(self.optimizer, loss * tf.cast(fraction, loss.dtype))
            grads = tape.gradient(loss, variables)
            update_metrics(self, y, y_pred, sample_weight)
            return [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
                    for g in grads]

        def train_step(self, data):
            unpack = keras.utils.unpack_x_y_sample_weight
            x, y, sample_weight = unpack(data)
            # Kept local: stored on `self`, Keras would track them as model weights.
            pruning_steps = _pruning_steps(self.model)
            variables = list(self.trainable_variables)
            first = next(t for t in tf.nest.flatten(x) if t is not None)
            n = first.shape[0]
            if n is None:
                n = tf.shape(first)[0]
            num, bounds = micro_batch_bounds(n, self.accumulation_steps)
            even = isinstance(n, int) and n % num == 0
            bounds = tf.convert_to_tensor(bounds, tf.int32)

            def micro(j):
                start = bounds[j]
                # Static micro-batch shapes when the batch divides evenly (TPU/XLA).
                size = n // num if even else bounds[j + 1] - bounds[j]
                # A replica can get no example of a short last batch: weight 0, not 0/0.
                fraction = tf.cast(size, tf.float32) / tf.cast(tf.maximum(n, 1), tf.float32)
                return self._micro_step(_take(x, start, size), _take(y, start, size),
                                        _take(sample_weight, start, size), fraction,
                                        variables, pruning_steps)

            # The first micro-batch runs outside the loop: it builds lazily created
            # state (tf_keras compiled losses and metrics) and tells which variables
            # get a gradient at all; those without one stay out of the update, as
            # they would in a plain step.
            grads = micro(0)
            used = [i for i, g in enumerate(grads) if g is not None]
            acc = [grads[i] for i in used]

            def body(j, *acc):
                grads = micro(j)
                return (j + 1, *[a + grads[i] for a, i in zip(acc, used)])

            if not (isinstance(num, int) and num == 1):
                # parallel_iterations=1: micro-batch j + 1 starts after j is done, so
                # only one micro-batch's activations are alive at a time.
                _, *acc = tf.while_loop(
                    lambda j, *_: j < num, body, (tf.constant(1), *acc),
                    parallel_iterations=1)
            grads = unscale_gradients(self.optimizer, list(acc))
            pairs = [(tf.cast(g, variables[i].dtype), variables[i])
                     for g, i in zip(grads, used)]
            apply_update(self.optimizer, pairs)
            for step in pruning_steps:
                step.assign(tf.cast(self.optimizer.iterations, step.dtype))
            return step_logs(self, self.get_metrics_result())

        def test_step(self, data):
            return step_logs(self, super().test_step(data))

        if engine_name(keras) == "keras3":

            def _maybe_symbolic_build(self, iterator=None, data_batch=None):
                # Under a strategy, Keras 3 takes one batch off the iterator (it is then
                # never trained on) and reduces it with MEAN across replicas to learn
                # the input shapes; under MultiWorkerMirroredStrategy that reduce of
                # int32 token ids fails ("PerReplica ... to a Tensor"). The dataset's
                # element spec has the shapes and costs no batch.
                strategy = self._distribute_strategy
                adapter = getattr(iterator, "data_adapter", None)
                if strategy is None or adapter is None:
                    return super()._maybe_symbolic_build(iterator, data_batch)
                spec = adapter.get_tf_dataset().element_spec
                with strategy.scope():
                    self._symbolic_build(data_batch=spec)

        def get_config(self):
            return {
                **super().get_config(),
                "model": keras.saving.serialize_keras_object(self.model),
                "accumulation_steps": self.accumulation_steps,
            }

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            config["model"] = keras.saving.deserialize_keras_object(
                config["model"], custom_objects=custom_objects)
            return cls(**config)

    return GradientAccumulator


def accumulate(model, steps):
    """Wraps `model` so that each training batch is one update over `steps` micro-batches.

    Args:
        model: a Keras 3 or tf_keras model; the wrapper is of the same engine.
        steps: int >= 1. Micro-batches per optimizer update.

    Returns:
        A `GradientAccumulator` to compile and fit; `.model` is `model`.
    """
    _check_steps(steps)
    return accumulator_class(keras_of(model))(model, accumulation_steps=steps)
