"""The `Distiller`: a gradient accumulator whose micro-batch loss adds the teacher's term.

It subclasses the engine's `GradientAccumulator` and overrides its two per-micro-batch
hooks (`micro_forward`, `compute_micro_loss`), so everything the accumulator gets right
holds for distillation too: the teacher's term is inside every micro-batch (k
micro-batches give the large batch's update), one update rule under every strategy, loss
scaling under `mixed_float16`, update-counted schedules and tfmot pruning steps.

    loss = alpha * student_loss + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(s / T))
           + hidden_weight * MSE(projection(student hidden), teacher hidden)

`student_loss` is the compiled loss (with its sample weights); the soft-target and
hidden terms use the same sample weights and Keras' `sum_over_batch_size` reduction.
Under a distribution strategy each replica's terms are divided by the number of
replicas, as Keras does with compiled losses, so the summed update equals one device's.
"""

import functools

import tensorflow as tf

from tf_effitrain import _registry
from tf_effitrain.distill.losses import hidden_state_mse, soft_target_kl, weighted_mean
from tf_effitrain.engine import keras_of, ops_for, register_serializable
from tf_effitrain.training.accumulation import accumulator_class

__all__ = ["TEACHER_LOGITS", "distiller_class", "distiller"]

# The input key under which precomputed teacher logits travel with a batch.
TEACHER_LOGITS = "teacher_logits"


def _check_args(alpha, temperature, hidden_layers, hidden_weight):
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1]. Received: alpha={alpha!r}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError("`temperature` must be a number > 0. "
                         f"Received: temperature={temperature!r}")
    if not isinstance(hidden_weight, (int, float)) or hidden_weight < 0:
        raise ValueError("`hidden_weight` must be a number >= 0. "
                         f"Received: hidden_weight={hidden_weight!r}")
    for pair in hidden_layers:
        if len(pair) != 2 or not all(isinstance(name, str) for name in pair):
            raise ValueError(
                "`hidden_layers` must be a list of [student_layer, teacher_layer] name "
                f"pairs. Received: hidden_layers={hidden_layers!r}")


def _layer_output(model, name, role):
    try:
        layer = model.get_layer(name)
    except ValueError:
        names = [layer.name for layer in model.layers]
        raise ValueError(f"The {role} has no layer {name!r} for hidden-state "
                         f"distillation. Its layers: {names}") from None
    try:
        return layer.output
    except (AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"Cannot read the output of the {role}'s layer {name!r} for hidden-state "
            f"distillation ({e}). It needs a functional model whose layer is called "
            "once (a shared layer has several outputs).") from None


class _Untracked:
    """A plain holder: neither engine tracks what it holds."""

    def __init__(self, **items):
        self.__dict__.update(items)


def _per_replica(value):
    """`value / replicas`, as Keras scales compiled losses: replicas' gradients are summed."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value / replicas if replicas > 1 else value


@functools.lru_cache(maxsize=None)
def distiller_class(keras):
    """The `Distiller` Model class for one engine (a `GradientAccumulator` subclass)."""
    ops = ops_for(keras)
    accumulator = accumulator_class(keras)

    @register_serializable(keras)
    class Distiller(accumulator):
        """Trains `student` to match a frozen `teacher` (knowledge distillation).

        Compile it with the student's own loss and metrics; `fit` trains the student,
        `evaluate` and `predict` run the student. Training logs `loss` (the student's
        compiled loss on the labels, comparable with `val_loss`) and `kd_loss` (the
        teacher's terms as weighted in the objective: `(1 - alpha) * T**2 * KL` plus
        the hidden-state terms); the objective is `alpha * (loss - regularization) +
        regularization + kd_loss`. The teacher runs in inference mode
        (no dropout, BatchNorm statistics frozen) and is never updated. Save
        `distiller.student`: it holds no teacher variable.

        Batches may carry precomputed teacher logits instead of running the teacher:
        inputs `{"token_ids": ids, "teacher_logits": logits}` (any single-input
        student; the key is `TEACHER_LOGITS`). Validation and test batches are plain.

        Args:
            student: Model. The model to train (same engine as this class).
            teacher: Model. A trained model with the student's inputs and output shape.
            alpha: float in [0, 1]. Weight of the student's own (compiled) loss; the
                soft-target term gets `1 - alpha`.
            temperature: float > 0. Softening temperature `T` of both distributions.
            accumulation_steps: int >= 1. Micro-batches per update (see `accumulate`).
            hidden_layers: list of `[student_layer, teacher_layer]` name pairs, or None.
                Adds the mean-squared error between each pair's outputs (over real
                tokens for `[batch, length, width]` outputs), through a learned linear
                projection when the widths differ. Functional models only.
            hidden_weight: float >= 0. Weight of the hidden-state terms.
            scale_by_t2: bool. Multiply the soft-target term by `T**2` (Hinton et al.),
                so its gradient scale does not change with `T`.

        Example:

        ```python
        distiller = et.distiller(student, teacher, alpha=0.5, temperature=2.0)
        distiller.compile(optimizer="adam",
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"])
        distiller.fit(train_ds, validation_data=val_ds, epochs=3)
        distiller.student.save("student.keras")
        ```
        """

        def __init__(self, student, teacher, alpha=0.5, temperature=2.0,
                     accumulation_steps=1, hidden_layers=None, hidden_weight=1.0,
                     scale_by_t2=True, **kwargs):
            hidden_layers = [list(pair) for pair in (hidden_layers or [])]
            _check_args(alpha, temperature, hidden_layers, hidden_weight)
            super().__init__(student, accumulation_steps=accumulation_steps, **kwargs)
            teacher.trainable = False
            self.teacher = teacher
            self.alpha = float(alpha)
            self.temperature = float(temperature)
            self.hidden_layers = hidden_layers
            self.hidden_weight = float(hidden_weight)
            self.scale_by_t2 = bool(scale_by_t2)
            # Kept out of attribute tracking: tf_keras would count a tracked metric's
            # totals among the model's weights (and checkpoints). `metrics` lists it.
            self._trackers = _Untracked(kd=keras.metrics.Mean(name="kd_loss"))
            self.student_features = self.teacher_features = None
            self.projections = []
            if hidden_layers:
                self._build_hidden(student, teacher)
            # Training calls the student (or its feature model) directly, never
            # `self`: mark the wrapper built so saving keeps the optimizer state.
            if getattr(student, "built", False):
                self.built = True

        @property
        def metrics(self):
            return [*super().metrics, self._trackers.kd]

        @property
        def student(self):
            """The model being trained (also `self.model`)."""
            return self.model

        def _build_hidden(self, student, teacher):
            outputs = [_layer_output(student, s, "student") for s, _ in self.hidden_layers]
            targets = [_layer_output(teacher, t, "teacher") for _, t in self.hidden_layers]
            # Feature models share the layers (and weights) of the student and teacher:
            # one forward pass gives the logits and the hidden states.
            self.student_features = keras.Model(student.inputs,
                                                [student.outputs[0], *outputs])
            self.teacher_features = keras.Model(teacher.inputs,
                                                [teacher.outputs[0], *targets])
            for i, (out, target) in enumerate(zip(outputs, targets)):
                width, wanted = out.shape[-1], target.shape[-1]
                if width == wanted:
                    self.projections.append(None)
                    continue
                projection = keras.layers.Dense(wanted, use_bias=False,
                                                name=f"hidden_projection_{i}")
                projection.build(tuple(out.shape))
                self.projections.append(projection)

        @staticmethod
        def split_inputs(x):
            """`(student inputs, precomputed teacher logits or None)`."""
            if not isinstance(x, dict) or TEACHER_LOGITS not in x:
                return x, None
            rest = {k: v for k, v in x.items() if k != TEACHER_LOGITS}
            inputs = next(iter(rest.values())) if len(rest) == 1 else rest
            return inputs, x[TEACHER_LOGITS]

        def call(self, inputs, training=None):
            return self.model(self.split_inputs(inputs)[0], training=training)

        def micro_forward(self, x):
            inputs, _ = self.split_inputs(x)
            if self.student_features is None:
                return self.model(inputs, training=True), None
            logits, *hidden = self.student_features(inputs, training=True)
            return logits, hidden

        def _teacher(self, inputs):
            if self.teacher_features is None:
                return self.teacher(inputs, training=False), []
            logits, *hidden = self.teacher_features(inputs, training=False)
            return logits, hidden

        def compute_micro_loss(self, x, y, y_pred, sample_weight, extras=None):
            # The compiled loss includes the student's regularization losses; alpha
            # weights the label term only.
            compiled = ops.training_loss(self, x, y, y_pred, sample_weight)
            regularization = _per_replica(tf.add_n([tf.cast(v, tf.float32) for v in
                                                    self.model.losses])) if (
                self.model.losses) else 0.0
            student_loss = compiled - regularization
            inputs, cached = self.split_inputs(x)
            if cached is not None and self.teacher_features is not None:
                raise ValueError(
                    "Precomputed teacher logits cannot serve hidden-state distillation "
                    "(it needs the teacher's hidden states): feed plain inputs, or "
                    "drop `hidden_layers`.")
            teacher_logits, teacher_hidden = (cached, []) if cached is not None else (
                self._teacher(inputs))
            teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
            kd = weighted_mean(soft_target_kl(teacher_logits, y_pred, self.temperature,
                                              self.scale_by_t2), sample_weight)
            extra = (1.0 - self.alpha) * kd
            batch = tf.shape(y_pred)[0]
            mask = self._token_mask(inputs)
            for projection, hidden, target in zip(self.projections, extras or [],
                                                  teacher_hidden):
                hidden = projection(hidden) if projection is not None else hidden
                mse = hidden_state_mse(hidden, tf.stop_gradient(target), mask)
                extra += self.hidden_weight * weighted_mean(mse, sample_weight)
            self._trackers.kd.update_state(extra, sample_weight=batch)
            return self.alpha * student_loss + regularization + _per_replica(extra)

        @staticmethod
        def _token_mask(inputs):
            """Real-token mask of integer token ids (0 is padding), else None."""
            if isinstance(inputs, dict):
                return None
            inputs = tf.convert_to_tensor(inputs)
            return tf.not_equal(inputs, 0) if inputs.dtype.is_integer else None

        def test_step(self, data):
            logs = super().test_step(data)
            # Evaluation runs the student alone: no distillation term to report.
            return {k: v for k, v in logs.items() if k != "kd_loss"}

        def get_config(self):
            return {
                **super().get_config(),
                "teacher": keras.saving.serialize_keras_object(self.teacher),
                "alpha": self.alpha,
                "temperature": self.temperature,
                "hidden_layers": self.hidden_layers,
                "hidden_weight": self.hidden_weight,
                "scale_by_t2": self.scale_by_t2,
            }

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            config["student"] = keras.saving.deserialize_keras_object(
                config.pop("model"), custom_objects=custom_objects)
            config["teacher"] = keras.saving.deserialize_keras_object(
                config["teacher"], custom_objects=custom_objects)
            return cls(**config)

    return Distiller


def distiller(student, teacher, alpha=0.5, temperature=2.0, accumulation_steps=1,
              hidden_layers=None, hidden_weight=1.0, scale_by_t2=True):
    """A `Distiller` of the student's engine: trains `student` against `teacher`.

    Args:
        student: Model. The model to train (Keras 3 or tf_keras).
        teacher: Model. A trained model of the same engine, inputs and classes.
        alpha: float in [0, 1]. Weight of the student's own loss on the labels.
        temperature: float > 0. Softening temperature.
        accumulation_steps: int >= 1. Micro-batches per update.
        hidden_layers: list of `[student_layer, teacher_layer]` pairs, or None.
        hidden_weight: float >= 0. Weight of the hidden-state terms.
        scale_by_t2: bool. Multiply the soft-target term by `T**2`.

    Returns:
        A `Distiller` to compile and fit; `.student` is `student`.

    Example:

    ```python
    with strategy.scope():
        teacher = keras.models.load_model("runs/demo/model.keras", compile=False)
        student = et.build_transformer_classifier(small_cfg, vocab_size, classes, 128)
        model = et.distiller(student, teacher, alpha=0.5, temperature=2.0,
                             accumulation_steps=4)
        model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=["accuracy"])
    model.fit(train_ds, validation_data=val_ds, epochs=5)
    model.student.save("student.keras")
    ```
    """
    keras = keras_of(student)
    classes = [int(m.outputs[0].shape[-1]) if getattr(m, "outputs", None) else None
               for m in (student, teacher)]
    if None not in classes and classes[0] != classes[1]:
        raise ValueError(
            "The teacher and the student must predict the same classes. Received: a "
            f"student with {classes[0]} outputs and a teacher with {classes[1]}.")
    if keras_of(teacher) is not keras:
        raise ValueError(
            "The teacher and the student must be models of the same Keras engine. "
            f"Received: a {type(teacher).__module__.split('.')[0]} teacher and a "
            f"{keras.__name__} student. Load or rebuild the teacher with the student's "
            "engine (`tf_effitrain.distill.load_teacher` does).")
    return distiller_class(keras)(student, teacher, alpha=alpha, temperature=temperature,
                                  accumulation_steps=accumulation_steps,
                                  hidden_layers=hidden_layers, hidden_weight=hidden_weight,
                                  scale_by_t2=scale_by_t2)


# Defines serializable classes: register them if an engine was imported meanwhile.
_registry.retry(__name__)
