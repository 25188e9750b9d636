import math

import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import OptimizerConfig, ScheduleConfig
from tf_effitrain.engine import get_keras, next_learning_rate
from tf_effitrain.optim import (
    DECAYS,
    OPTIMIZERS,
    build_optimizer,
    build_schedule,
    lamb_class,
    schedule_class,
    warmup_decay,
)

from harness import ENGINES
PEAK, WARMUP, DECAY, ALPHA = 3e-3, 10, 40, 0.1


def closed_form(step, decay):
    """The schedule written out independently, in plain Python."""
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    t = step - WARMUP
    p = min(t, DECAY) / DECAY
    return {
        "constant": PEAK,
        "cosine": PEAK * (ALPHA + (1 - ALPHA) * 0.5 * (1 + math.cos(math.pi * p))),
        "linear": PEAK * (1 - (1 - ALPHA) * p),
        "polynomial": PEAK * ((1 - ALPHA) * (1 - p) ** 2.0 + ALPHA),
        "exponential": PEAK * 0.5 ** (t / DECAY),
    }[decay]


@pytest.mark.parametrize("decay", DECAYS)
def test_schedule_matches_closed_form(decay):
    for step in [0, 1, 5, 9, 10, 11, 20, 30, 49, 50, 51, 80]:
        got = float(warmup_decay(step, PEAK, WARMUP, DECAY, decay, alpha=ALPHA,
                                 decay_rate=0.5, power=2.0))
        assert got == pytest.approx(closed_form(step, decay), rel=1e-5, abs=1e-9), step


def test_no_warmup_starts_at_peak_and_cosine_ends_at_alpha():
    assert float(warmup_decay(0, 1.0, 0, 100, "cosine")) == pytest.approx(1.0)
    assert float(warmup_decay(100, 1.0, 0, 100, "cosine", alpha=0.2)) == pytest.approx(0.2)
    assert float(warmup_decay(10 ** 6, 1.0, 0, 100, "linear")) == pytest.approx(0.0)


def test_build_schedule_sizes_warmup_and_decay_from_total_steps():
    keras = get_keras("keras3")
    s = build_schedule(ScheduleConfig(name="linear", warmup_fraction=0.1), 1.0, 200, keras)
    assert (s.warmup_steps, s.decay_steps) == (20, 180)
    s = build_schedule(ScheduleConfig(warmup_steps=5, decay_steps=7), 1.0, 200, keras)
    assert (s.warmup_steps, s.decay_steps) == (5, 7)


@pytest.mark.parametrize("engine", ENGINES)
def test_schedule_serialization_round_trip(engine):
    keras = get_keras(engine)
    sched = schedule_class(keras)(PEAK, warmup_steps=WARMUP, decay_steps=DECAY,
                                  decay="polynomial", alpha=ALPHA, power=2.0)
    clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
    assert clone.get_config() == sched.get_config()
    assert float(clone(23)) == pytest.approx(float(sched(23)))


def test_schedule_argument_errors():
    cls = schedule_class(get_keras("keras3"))
    with pytest.raises(ValueError, match="`decay_steps` must be an integer >= 1"):
        cls(1.0, decay_steps=0)
    with pytest.raises(ValueError, match="`decay` must be one of"):
        warmup_decay(0, 1.0, decay="step")


@pytest.mark.parametrize("engine", ENGINES)
def test_learning_rate_advances_once_per_applied_update(engine):
    keras = get_keras(engine)
    # Plain SGD (no momentum, no clipping): each update moves the variable by exactly
    # the learning rate it used, so this reads the rate actually applied.
    opt = build_optimizer(
        OptimizerConfig(name="sgd", learning_rate=PEAK, weight_decay=0.0, beta_1=0.0,
                        global_clipnorm=None),
        ScheduleConfig(name="cosine", warmup_steps=WARMUP, decay_steps=DECAY, alpha=ALPHA),
        100, keras)
    var = tf.Variable(np.zeros(3, "float64"))
    for n in range(1, 60):
        before = var.numpy().copy()
        opt.apply_gradients([(tf.ones(3, tf.float64), var)])
        assert int(opt.iterations) == n
        used = before[0] - var.numpy()[0]
        assert used == pytest.approx(closed_form(n - 1, "cosine"), rel=1e-5), n
        assert next_learning_rate(opt) == pytest.approx(closed_form(n, "cosine"), rel=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_steps(engine, name):
    keras = get_keras(engine)
    opt = build_optimizer(OptimizerConfig(name=name), ScheduleConfig(warmup_steps=0), 10, keras)
    var = tf.Variable(np.ones((4, 3), "float32"))
    opt.apply_gradients([(tf.ones((4, 3)), var)])
    assert np.all(var.numpy() < 1.0)  # every optimizer moved against the gradient


@pytest.mark.parametrize("engine", ENGINES)
def test_weight_decay_skips_norms_and_biases(engine):
    keras = get_keras(engine)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense"),
                              keras.layers.LayerNormalization(name="norm")])
    for w in model.weights:
        w.assign(tf.ones_like(w))
    opt = build_optimizer(OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.5,
                                          global_clipnorm=None),
                          ScheduleConfig(name="constant", warmup_steps=0), 10, keras)
    zeros = [tf.zeros_like(w) for w in model.trainable_weights]
    opt.apply_gradients(zip(zeros, model.trainable_weights))
    after = {w.name.split(":")[0]: w.numpy() for w in model.trainable_weights}
    names = [w.name for w in model.trainable_weights]
    decayed = [n for n, w in zip(names, model.trainable_weights) if not np.allclose(w.numpy(), 1.0)]
    # Only the Dense kernel decays: 1 - lr * wd = 0.95.
    assert len(decayed) == 1 and "kernel" in decayed[0]
    kernel = [v for k, v in after.items() if "kernel" in k][0]
    np.testing.assert_allclose(kernel, 0.95, rtol=1e-6)


def test_tf_keras_lamb_matches_keras3_lamb():
    rng = np.random.RandomState(0)
    w0 = rng.randn(6, 4).astype("float32")
    grads = [rng.randn(6, 4).astype("float32") for _ in range(5)]
    results = []
    for engine in ENGINES:
        keras = get_keras(engine)
        var = tf.Variable(w0)
        opt = lamb_class(keras)(learning_rate=0.01, weight_decay=0.1, beta_2=0.99)
        for g in grads:
            opt.apply_gradients([(tf.constant(g), var)])
        results.append(var.numpy())
    assert not np.allclose(results[0], w0)
    np.testing.assert_allclose(results[1], results[0], atol=1e-6)


def test_tf_keras_lamb_config_round_trip():
    keras = get_keras("tf_keras")
    opt = lamb_class(keras)(learning_rate=0.02, beta_1=0.8, epsilon=1e-6, weight_decay=0.1)
    clone = type(opt).from_config(opt.get_config())
    assert clone.get_config()["beta_1"] == 0.8
    assert clone.get_config()["epsilon"] == 1e-6
    assert clone.get_config()["weight_decay"] == 0.1
