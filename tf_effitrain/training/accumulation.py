"""Gradient accumulation by micro-batching inside one `train_step`.

The step receives the effective batch, splits it into `accumulation_steps`
micro-batches, runs forward and backward on each in a `tf.while_loop` (one
micro-batch's activations alive at a time), sums float32 gradients weighted by
micro-batch size, and applies them once. So:

- one update equals one update on the whole batch with dense gradients (mean loss over
  all its examples), whatever the micro-batch sizes, with sample weights, weight decay
  and clipping (see docs/accumulation.md for what "equals" means, in numbers);
- there is no conditional around a synchronization point: the only cross-replica
  reduction is the one `apply_gradients` always does, so MirroredStrategy,
  MultiWorkerMirroredStrategy and TPUStrategy work (Keras 3's optimizer-level
  `gradient_accumulation_steps` crashes under MirroredStrategy: keras#20582);
- micro-batches have two sizes at most, `q` and `q + 1`, each run by its own loop, so
  every slice has a size fixed by the batch's shape: XLA (`jit_compile=True`) compiles
  it for static, uneven and dynamic (bucketed) batches alike;
- `optimizer.iterations`, and with it learning-rate schedules and EMA, advance once per
  applied update; counters that other code advances per training call (tfmot's pruning
  step) are pinned to it by hooks registered with `register_update_count_hook`;
- the micro-batches after the first are traced inside scopes registered with
  `register_micro_loop_scope`: work that must run once per update and cannot run in a
  `while_loop` (tfmot's mask updates call `merge_call`) is done by the first
  micro-batch, outside the loop;
- metrics and the loss see every example once per step: the progress bar is per
  effective batch.

BatchNormalization inside the model normalizes each micro-batch with that micro-batch's
statistics and updates its moving averages once per micro-batch (k times per step):
the update equals the sum of the micro-batches' gradients, not the large batch's.
"""

import contextlib
import functools

import tensorflow as tf

from tf_effitrain import _registry
from tf_effitrain.engine import engine_name, keras_of, ops_for, register_serializable

__all__ = ["micro_batch_bounds", "accumulator_class", "accumulate",
           "register_update_count_hook", "register_micro_loop_scope"]

_UPDATE_COUNT_HOOKS = []
_MICRO_LOOP_SCOPES = []


def register_update_count_hook(hook):
    """Registers `hook(model, updates)`, called before every micro-batch and after the
    update with the number of applied updates (an int64 tensor).

    For state that advances on every training call of a layer but must follow applied
    updates instead (tfmot's `pruning_step`: see `tf_effitrain.compress`). Registering
    the same hook twice has no effect.

    Returns:
        `hook`, so this works as a decorator.
    """
    if hook not in _UPDATE_COUNT_HOOKS:
        _UPDATE_COUNT_HOOKS.append(hook)
    return hook


def register_micro_loop_scope(scope):
    """Registers `scope(model)`, a context manager entered while the micro-batches
    after the first one are traced (inside the accumulation `tf.while_loop`).

    For per-update work a layer does on every training call that cannot run in a
    `while_loop` under a strategy (tfmot's mask updates use `merge_call`): the scope
    turns it off there, and the first micro-batch, traced outside the loop, does it
    once per update. Registering the same scope twice has no effect.

    Returns:
        `scope`, so this works as a decorator.
    """
    if scope not in _MICRO_LOOP_SCOPES:
        _MICRO_LOOP_SCOPES.append(scope)
    return scope


def _split(batch_size, accumulation_steps):
    """`(num, q, r)`: `num - r` micro-batches of `q` examples, then `r` of `q + 1`."""
    if isinstance(batch_size, int):
        num = max(min(accumulation_steps, batch_size), 1)
    else:
        num = tf.maximum(tf.minimum(tf.constant(accumulation_steps, tf.int32),
                                    batch_size), 1)
    return num, batch_size // num, batch_size % num


def micro_batch_bounds(batch_size, accumulation_steps):
    """Boundaries of `min(accumulation_steps, batch_size)` balanced micro-batches.

    Args:
        batch_size: int or scalar int32 tensor. Examples in the effective batch.
        accumulation_steps: int >= 1.

    Returns:
        `(num, bounds)`: micro-batch `j` is `[bounds[j], bounds[j + 1])`. The first
        micro-batches hold `batch_size // num` examples, the last `batch_size % num`
        one more; none is empty. `num` and `bounds` are Python ints when `batch_size`
        is, else int32 tensors.
    """
    num, q, r = _split(batch_size, accumulation_steps)
    if isinstance(batch_size, int):
        return num, [j * q + max(0, j - (num - r)) for j in range(num + 1)]
    j = tf.range(num + 1)
    return num, j * q + tf.maximum(0, j - (num - r))


def _check_steps(accumulation_steps):
    if (not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool)
            or accumulation_steps < 1):
        raise ValueError(
            "`accumulation_steps` must be an integer >= 1. "
            f"Received: accumulation_steps={accumulation_steps!r}"
        )


# Reductions whose micro-batch losses, weighted by n_j / n, add up to the batch's.
_MEAN_REDUCTIONS = (None, "auto", "sum_over_batch_size")


def _check_loss_reduction(loss):
    """Refuses compiled losses whose reduction breaks the n_j / n weighting."""
    for item in tf.nest.flatten(loss):
        reduction = getattr(item, "reduction", None)
        if reduction not in _MEAN_REDUCTIONS:
            raise ValueError(
                "Gradient accumulation needs losses with the default "
                "`reduction='sum_over_batch_size'` (the mean over the batch's examples: "
                "micro-batch means weighted by their size add up to it). Received: "
                f"{type(item).__name__}(reduction={reduction!r}). Use the default "
                "reduction, or scale the loss yourself with sample weights.")


def _take(structure, start, size):
    """Rows `[start, start + size)` of every tensor in `structure` (None stays None).

    The slice size is spelled out from the tensor's shape (no `-1`): XLA needs every
    dimension of a dynamic slice to be known when it compiles.
    """

    def take(t):
        if t is None:
            return None
        t = tf.convert_to_tensor(t)
        rank = t.shape.rank
        if rank == 1:
            return tf.slice(t, [start], [size])
        rest = [d if d is not None else tf.shape(t)[i + 1]
                for i, d in enumerate(t.shape.as_list()[1:])]
        return tf.slice(t, [start] + [0] * (rank - 1), tf.stack([size, *rest]))

    return tf.nest.map_structure(take, structure)


@functools.lru_cache(maxsize=None)
def accumulator_class(keras):
    """The `GradientAccumulator` Model class for one engine."""
    ops = ops_for(keras)

    @register_serializable(keras)
    class GradientAccumulator(keras.Model):
        """Trains `model` with gradients accumulated over micro-batches of each batch.

        Feed it batches of the *effective* size (micro-batch size x
        `accumulation_steps`); each training step splits the batch, accumulates, and
        applies one optimizer update. Inference and evaluation run `model` unchanged.
        Compile and fit this wrapper; save `wrapper.model` to ship the plain model.

        Args:
            model: Model. The model to train (any Keras model of the same engine).
            accumulation_steps: int. Micro-batches per update (`>= 1`). A batch with
                fewer examples is split into one micro-batch per example.

        Example:

        ```python
        model = et.accumulate(build_model(), accumulation_steps=8)  # batch 8 x 32
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

        def _pin_counters(self):
            updates = tf.cast(self.optimizer.iterations, tf.int64)
            for hook in _UPDATE_COUNT_HOOKS:
                hook(self.model, updates)

        def micro_forward(self, x):
            """The training forward pass of one micro-batch: `(y_pred, extras)`.

            `y_pred` feeds the compiled loss and metrics; `extras` (None here) carries
            whatever else `compute_micro_loss` needs from the same pass (the
            Distiller's hidden states)."""
            return self(x, training=True), None

        def compute_micro_loss(self, x, y, y_pred, sample_weight, extras=None):
            """The loss of one micro-batch (mean over its examples). Subclasses (the
            Distiller) override it to add terms; the default is the compiled loss."""
            return ops.training_loss(self, x, y, y_pred, sample_weight)

        def _micro_step(self, data, start, size, n, variables):
            """Scaled gradients of one micro-batch's loss, weighted by its share."""
            x, y, sample_weight = _take(data, start, size)
            self._pin_counters()
            with tf.GradientTape() as tape:
                y_pred, extras = self.micro_forward(x)
                loss = self.compute_micro_loss(x, y, y_pred, sample_weight, extras)
                # Keras' mean over a micro-batch of n_j examples, times n_j / n, summed
                # over micro-batches, is the mean over the whole batch. A replica can
                # get no example of a short last batch: weight 0, not 0/0.
                fraction = tf.cast(size, loss.dtype) / tf.cast(tf.maximum(n, 1), loss.dtype)
                loss = ops.scale_loss(self.optimizer, loss * fraction)
            grads = tape.gradient(loss, variables)
            ops.update_metrics(self, y, y_pred, sample_weight)
            return [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32)
                    for g in grads]

        def train_step(self, data):
            _check_loss_reduction(getattr(self, "loss", None))
            data = keras.utils.unpack_x_y_sample_weight(data)
            variables = list(self.trainable_variables)
            first = next(t for t in tf.nest.flatten(data[0]) if t is not None)
            n = first.shape[0]
            if n is None:
                n = tf.shape(first)[0]
            num, q, r = _split(n, self.accumulation_steps)
            static = isinstance(n, int)

            # The first micro-batch runs outside the loops: it builds lazily created
            # state (tf_keras compiled losses and metrics) and tells which variables
            # get a gradient at all; those without one stay out of the update, as
            # they would in a plain step.
            grads = self._micro_step(data, 0, q, n, variables)
            used = [i for i, g in enumerate(grads) if g is not None]
            acc = [grads[i] for i in used]

            def loop(acc, count, first_start, size, begin=0):
                """Adds micro-batches `begin..count-1` of `size` examples each."""
                if static and count <= begin:
                    return acc

                def body(j, *acc):
                    grads = self._micro_step(data, first_start + j * size, size, n,
                                             variables)
                    return (j + 1, *[a + grads[i] for a, i in zip(acc, used)])

                # parallel_iterations=1: micro-batch j + 1 starts after j is done, so
                # only one micro-batch's activations are alive at a time.
                _, *acc = tf.while_loop(lambda j, *_: j < count, body,
                                        (tf.constant(begin), *acc),
                                        parallel_iterations=1)
                return list(acc)

            with contextlib.ExitStack() as stack:
                for scope in _MICRO_LOOP_SCOPES:
                    stack.enter_context(scope(self))
                acc = loop(acc, num - r, 0, q, begin=1)   # the rest of the size-q ones
                # With a traced batch size, XLA compiles this loop even when it runs
                # 0 times (r = 0); on a 1-example batch its q + 1 = 2 rows would not
                # fit the slice. When r > 0, q + 1 <= n, so the minimum is exact.
                big = q + 1 if static else tf.minimum(q + 1, n)
                acc = loop(acc, r, (num - r) * q, big)  # then the size-(q + 1) ones
            grads = ops.unscale_gradients(self.optimizer, acc)
            pairs = [(tf.cast(g, variables[i].dtype), variables[i])
                     for g, i in zip(grads, used)]
            ops.apply_update(self.optimizer, pairs)
            self._pin_counters()
            return ops.step_logs(self.get_metrics_result())

        def test_step(self, data):
            return ops.step_logs(super().test_step(data))

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
                # A dataset distributed by `distribute_datasets_from_function` has one
                # `PerReplicaSpec` per component: any replica's spec has the shapes.
                spec = tf.nest.map_structure(
                    lambda s: s._value_specs[0] if hasattr(s, "_value_specs") else s,
                    spec)
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


def accumulate(model, accumulation_steps):
    """Wraps `model` so that each training batch is one update over micro-batches.

    Args:
        model: a Keras 3 or tf_keras model; the wrapper is of the same engine.
        accumulation_steps: int >= 1. Micro-batches per optimizer update.

    Returns:
        A `GradientAccumulator` to compile and fit; `.model` is `model`.

    Example:

    ```python
    model = et.accumulate(et.build_transformer_classifier(cfg, 4000, 6, 128),
                          accumulation_steps=8)
    model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.fit(train_ds.rebatch(256))   # 8 micro-batches of 32 per update
    ```
    """
    _check_steps(accumulation_steps)
    return accumulator_class(keras_of(model))(model, accumulation_steps=accumulation_steps)


# Defines serializable classes: register them if an engine was imported meanwhile.
_registry.retry(__name__)
