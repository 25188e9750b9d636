"""Distillation losses: pure TensorFlow functions, computed in float32.

The soft-target term follows Hinton et al. (2015): the KL divergence between the
teacher's and the student's softened distributions, `softmax(logits / T)`, multiplied
by `T**2` so that its gradients keep the same scale as the hard-label term's when `T`
changes (the softened gradients shrink as `1 / T**2`).
"""

import tensorflow as tf

__all__ = ["soft_target_kl", "hidden_state_mse", "weighted_mean", "distillation_loss"]


def soft_target_kl(teacher_logits, student_logits, temperature=2.0, scale_by_t2=True):
    """Per-example `KL(softmax(teacher / T) || softmax(student / T))`, times `T**2`.

    Args:
        teacher_logits: float tensor `[batch, classes]`.
        student_logits: float tensor `[batch, classes]`.
        temperature: float > 0. Softening temperature `T`.
        scale_by_t2: bool. Multiply by `T**2` (keeps the gradient scale independent of
            `T`).

    Returns:
        float32 tensor `[batch]`.
    """
    # float32 whatever the dtype policy: bf16 log-softmax differences lose the small
    # probabilities the soft targets are about.
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p_teacher = tf.nn.log_softmax(t, axis=-1)
    log_p_student = tf.nn.log_softmax(s, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return kl * (temperature ** 2) if scale_by_t2 else kl


def hidden_state_mse(student_hidden, teacher_hidden, mask=None):
    """Per-example mean squared error between two hidden states of the same shape.

    Args:
        student_hidden: float tensor `[batch, ...]` (already projected to the
            teacher's width).
        teacher_hidden: float tensor of the same shape.
        mask: bool tensor `[batch, length]` or None. For `[batch, length, width]`
            states: average over the real (True) positions only.

    Returns:
        float32 tensor `[batch]`.
    """
    diff = tf.square(tf.cast(student_hidden, tf.float32) - tf.cast(teacher_hidden, tf.float32))
    if mask is None or diff.shape.rank != 3:
        return tf.reduce_mean(tf.reshape(diff, [tf.shape(diff)[0], -1]), axis=-1)
    per_position = tf.reduce_mean(diff, axis=-1)
    mask = tf.cast(mask, tf.float32)
    # An all-padding row has no real position: its error is 0, not 0/0.
    return tf.reduce_sum(per_position * mask, axis=-1) / tf.maximum(
        tf.reduce_sum(mask, axis=-1), 1.0)


def weighted_mean(values, sample_weight=None):
    """`sum(w * values) / batch`: Keras' `sum_over_batch_size` reduction.

    Dividing by the number of examples (not by the sum of weights) is what Keras' own
    losses do, and what makes micro-batch means weighted by their size add up to the
    batch's mean under gradient accumulation.

    Args:
        values: float tensor `[batch]`. Per-example values.
        sample_weight: float tensor `[batch]` / `[batch, 1]`, or None.

    Returns:
        float32 scalar.
    """
    values = tf.cast(values, tf.float32)
    if sample_weight is not None:
        values = values * tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(values))
    return tf.reduce_sum(values) / tf.cast(tf.maximum(tf.size(values), 1), tf.float32)


def distillation_loss(labels, student_logits, teacher_logits, alpha=0.5, temperature=2.0,
                      sample_weight=None, scale_by_t2=True):
    """`alpha * CE(labels, student) + (1 - alpha) * T**2 * KL(teacher_T || student_T)`.

    Both terms are averaged with Keras' `sum_over_batch_size` reduction (see
    `weighted_mean`), so the result equals what a `Distiller` compiled with
    `SparseCategoricalCrossentropy(from_logits=True)` minimizes.

    Args:
        labels: int tensor `[batch]`. Class indices.
        student_logits: float tensor `[batch, classes]`.
        teacher_logits: float tensor `[batch, classes]`.
        alpha: float in [0, 1]. Weight of the hard-label term.
        temperature: float > 0.
        sample_weight: float tensor `[batch]` or None.
        scale_by_t2: bool. See `soft_target_kl`.

    Returns:
        float32 scalar.

    Example:

    ```python
    loss = et.distill.distillation_loss(y, student(x), teacher(x), alpha=0.5,
                                        temperature=2.0)
    ```
    """
    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(student_logits, tf.float32))
    soft = soft_target_kl(teacher_logits, student_logits, temperature, scale_by_t2)
    return (alpha * weighted_mean(hard, sample_weight)
            + (1.0 - alpha) * weighted_mean(soft, sample_weight))
