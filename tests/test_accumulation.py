"""Gradient accumulation: one update over k micro-batches equals one large-batch update.

The reference ("large batch") is written out by hand: one `tf.function` step on the whole
batch, gradients densified (Keras' Adam updates `IndexedSlices` embedding gradients row by
row when a token repeats, which is a different update; see docs/accumulation.md), applied
once. On a model without an Embedding, the reference is plain `model.fit` itself.

Tolerance: max |w_accumulated - w_large_batch| <= 1e-6 in float32. The test model uses
`shared_kv`: with separate keys, the key bias has an exactly-zero gradient (softmax is
shift invariant), and LAMB and Adafactor normalise its float rounding noise (~1e-11)
into full-size steps in *any* two implementations of the same update, accumulated or not.
"""

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import ModelConfig, OptimizerConfig, ScheduleConfig
from tf_effitrain.engine import get_keras, next_learning_rate, ops_for
from tf_effitrain.models import build_transformer_classifier
from tf_effitrain.optim import build_optimizer
from tf_effitrain.training.accumulation import accumulate, accumulator_class, micro_batch_bounds

from cluster import run_cluster
from harness import ENGINES, max_abs_diff, round_trip_in_fresh_process

VOCAB, CLASSES, SEQ = 50, 3, 10
TOL = 1e-6


def _batch(n, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randint(1, VOCAB, size=(n, SEQ)).astype("int32")
    x[::3, 6:] = 0  # padded rows in every micro-batch
    y = rng.randint(0, CLASSES, size=(n,)).astype("int32")
    sw = rng.uniform(0.2, 2.0, size=(n,)).astype("float32")
    return x, y, sw


def _model(keras, seed=1, **options):
    keras.utils.set_random_seed(seed)
    cfg = ModelConfig(d_model=16, num_heads=2, ffn_dim=24, num_layers=1, dropout=0.0,
                      shared_kv=True, **options)
    return build_transformer_classifier(cfg, VOCAB, CLASSES, 16, keras=keras)


def _optimizer(keras, name, lr=None, clipnorm=0.05, ema=None):
    # A small clip norm so global-norm clipping really acts (checked below). SGD steps
    # scale with the clipped gradient: a large rate makes them as visible as Adam's.
    lr = lr or (1.0 if name == "sgd" else 1e-3)
    return build_optimizer(
        OptimizerConfig(name=name, learning_rate=lr, weight_decay=0.01,
                        global_clipnorm=clipnorm, ema_momentum=ema),
        ScheduleConfig(name="cosine", warmup_steps=2, decay_steps=10), 12, keras)


def _loss(keras):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def loss_scale_optimizer(optimizer, initial_scale):
    from tf_effitrain.engine import ops_of

    return ops_of(optimizer).loss_scale_optimizer(optimizer, initial_scale)


@functools.lru_cache(maxsize=None)
def _reference_weights(engine, name, n, steps):
    """The large-batch reference's weights and gradient norms, computed once a session."""
    x, y, sw = _batch(n)
    model, opt, norms = _large_batch(get_keras(engine), name, x, y, sw, steps)
    return model.get_weights(), tuple(norms), int(opt.iterations)


def _large_batch(keras, name, x, y, sw, steps, **options):
    """The reference: `steps` plain updates on the whole batch."""
    model, opt, loss_fn = _model(keras, **options), _optimizer(keras, name), _loss(keras)
    norms = []

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True), sample_weight=sw)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)]
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return tf.linalg.global_norm(grads)

    for _ in range(steps):
        norms.append(float(step()))
    return model, opt, norms


def _accumulated(keras, name, x, y, sw, steps, k, strategy=None, options=None, **model_options):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = accumulate(_model(keras, **model_options), k)
        model.compile(optimizer=_optimizer(keras, name), loss=_loss(keras),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(len(x)).repeat()
    if options is not None:
        ds = ds.with_options(options)
    history = model.fit(ds, epochs=steps, steps_per_epoch=1, verbose=0, shuffle=False)
    return model, history


_max_diff = max_abs_diff


# ---- the split ------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(24, 4), (22, 4), (5, 8), (1, 3), (7, 1), (8, 8)])
def test_micro_batches_partition_the_batch(n, k):
    num, bounds = micro_batch_bounds(n, k)
    sizes = np.diff(bounds)
    assert num == min(n, k) and bounds[0] == 0 and bounds[-1] == n
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    t_num, t_bounds = micro_batch_bounds(tf.constant(n), k)
    assert int(t_num) == num and t_bounds.numpy().tolist() == bounds


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_accumulation_steps_are_validated(bad):
    keras = get_keras("keras3")
    with pytest.raises(ValueError, match=r"`accumulation_steps` must be an integer >= 1\. "
                                         r"Received: accumulation_steps="):
        accumulate(_model(keras), bad)


@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight"])
def test_a_loss_that_is_not_a_batch_mean_is_refused(reduction):
    keras = get_keras("keras3")
    x, y, sw = _batch(8)
    model = accumulate(_model(keras), 2)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=reduction))
    before = model.model.get_weights()
    with pytest.raises(ValueError, match="needs losses with the default "
                                         "`reduction='sum_over_batch_size'`"):
        model.fit(x, y, verbose=0)
    assert _max_diff(model.model, before) == 0.0


# ---- exactness ------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name, n, k", [
    ("sgd", 22, 4), ("adamw", 22, 4), ("lamb", 22, 4), ("adafactor", 22, 4),
    ("adamw", 24, 4),  # even split: static micro-batch shapes
    ("adamw", 5, 8),   # fewer examples than steps: one example per micro-batch
])
def test_accumulated_update_equals_large_batch_update(engine, name, n, k):
    keras = get_keras(engine)
    x, y, sw = _batch(n)
    reference, norms, iterations = _reference_weights(engine, name, n, 3)
    model, _ = _accumulated(keras, name, x, y, sw, steps=3, k=k)
    assert min(norms) > 0.05  # clipping was active in every update
    assert int(model.optimizer.iterations) == iterations == 3
    assert _max_diff(model.model, _model(keras)) > 1e-4  # it trained
    assert _max_diff(model.model, reference) <= TOL


@pytest.mark.parametrize("engine, static", [("keras3", True), ("keras3", False),
                                            ("tf_keras", False)])
def test_xla_accumulation_equals_large_batch_on_uneven_and_dynamic_batches(engine, static):
    """`jit_compile=True`: 22 examples in 4 micro-batches (sizes 5, 5, 6, 6), with the
    batch shape static (22, 10) or unknown (None, None) when the step is traced."""
    keras = get_keras(engine)
    x, y, sw = _batch(22)
    reference, _, _ = _reference_weights(engine, "adamw", 22, 3)
    model = accumulate(_model(keras), 4)
    model.compile(optimizer=_optimizer(keras, "adamw"), loss=_loss(keras), jit_compile=True)
    if static:
        ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(22, drop_remainder=True)
    else:  # a generator with unknown dimensions, like bucketed batches
        spec = (tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None], tf.float32))
        ds = tf.data.Dataset.from_generator(lambda: iter([(x, y, sw)]),
                                            output_signature=spec)
    assert ds.element_spec[0].shape.is_fully_defined() is static
    model.fit(ds.repeat(), epochs=3, steps_per_epoch=1, verbose=0)
    assert _max_diff(model.model, reference) <= TOL


@pytest.mark.parametrize("engine", ENGINES)
def test_xla_accumulation_on_a_batch_smaller_than_the_micro_batch_count(engine):
    """A bucketed epoch can end on a 1-example batch: with k=3, XLA still compiles the
    loop over the larger micro-batches (size 2 here) that never runs, so its slice must
    fit the batch. The XLA step equals the graph step on batches of 1, 2 and 5."""
    keras = get_keras(engine)
    x, y, sw = _batch(8)
    spec = (tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.float32))
    parts = [(x[:1], y[:1], sw[:1]), (x[1:3], y[1:3], sw[1:3]), (x[3:], y[3:], sw[3:])]

    def trained(jit_compile):
        model = accumulate(_model(keras), 3)
        model.compile(optimizer=_optimizer(keras, "adamw"), loss=_loss(keras),
                      jit_compile=jit_compile)
        # A declared cardinality, as the trainer's datasets have: on an unknown one
        # tf_keras counts an extra optimizer iteration when the iterator runs out.
        ds = tf.data.Dataset.from_generator(lambda: iter(parts), output_signature=spec)
        model.fit(ds.apply(tf.data.experimental.assert_cardinality(3)), epochs=1,
                  verbose=0)
        assert int(model.optimizer.iterations) == 3
        return model.model

    xla = trained(True)
    assert _max_diff(xla, _model(keras)) > 1e-4  # it trained
    assert _max_diff(xla, trained(False)) <= TOL


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_without_embedding_the_wrapper_equals_plain_fit(engine, name):
    """Plain `model.fit` is the reference when no gradient is IndexedSlices: a model on
    float inputs (dense projection in place of the token embedding), AdamW with weight
    decay and clipping, sample weights, k=4 on an uneven batch."""
    keras = get_keras(engine)
    rng = np.random.RandomState(3)
    x = rng.randn(22, 10, 8).astype("float32")
    y = rng.randint(0, CLASSES, size=(22,)).astype("int32")
    sw = rng.uniform(0.2, 2.0, size=(22,)).astype("float32")

    def model():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((10, 8))
        h = keras.layers.Dense(16, activation="gelu")(inputs)
        h = keras.layers.LayerNormalization()(h)
        h = keras.layers.GlobalAveragePooling1D()(h)
        return keras.Model(inputs, keras.layers.Dense(CLASSES)(h))

    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(22)
    plain = model()
    plain.compile(optimizer=_optimizer(keras, name), loss=_loss(keras))
    plain.fit(ds, epochs=3, verbose=0)
    wrapped = accumulate(model(), 4)
    wrapped.compile(optimizer=_optimizer(keras, name), loss=_loss(keras))
    wrapped.fit(ds, epochs=3, verbose=0)
    assert _max_diff(plain, model()) > 1e-3
    assert _max_diff(wrapped.model, plain) <= TOL


@pytest.mark.parametrize("engine", ENGINES)
def test_loss_and_metrics_are_per_effective_batch(engine):
    keras = get_keras(engine)
    x, y, sw = _batch(22)
    logits = _model(keras)(x, training=False)  # the weights the first step sees
    want_loss = float(_loss(keras)(y, logits, sample_weight=sw))
    # `metrics` ignore sample weights in both engines (only `weighted_metrics` use them).
    want_acc = float(np.mean(np.argmax(logits, -1) == y))
    model, history = _accumulated(keras, "sgd", x, y, sw, steps=1, k=4)
    assert history.history["loss"][0] == pytest.approx(want_loss, rel=1e-5)
    assert history.history["accuracy"][0] == pytest.approx(want_acc, abs=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_schedule_counts_applied_updates(engine):
    keras = get_keras(engine)
    x, y, sw = _batch(16)
    rates = {}
    for k in (1, 8):
        model, _ = _accumulated(keras, "adamw", x, y, sw, steps=5, k=k)
        assert int(model.optimizer.iterations) == 5
        rates[k] = next_learning_rate(model.optimizer)
    reference = build_optimizer(OptimizerConfig(learning_rate=1e-3),
                                ScheduleConfig(name="cosine", warmup_steps=2, decay_steps=10),
                                12, keras)
    assert rates[1] == rates[8] == pytest.approx(float(reference._learning_rate(5)))


@pytest.mark.parametrize("engine", ENGINES)
def test_ema_advances_once_per_update(engine):
    keras = get_keras(engine)
    x, y, sw = _batch(22)
    ref_model, loss_fn = _model(keras), _loss(keras)
    ref_opt = _optimizer(keras, "adamw", ema=0.5)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, ref_model(x, training=True), sample_weight=sw)
        grads = [tf.convert_to_tensor(g)
                 for g in tape.gradient(loss, ref_model.trainable_variables)]
        ref_opt.apply_gradients(zip(grads, ref_model.trainable_variables))

    for _ in range(3):
        step()
    model = accumulate(_model(keras), 4)
    model.compile(optimizer=_optimizer(keras, "adamw", ema=0.5),
                  loss=_loss(keras))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(22), epochs=3, verbose=0)
    ema = [v.numpy() for v in model.optimizer._model_variables_moving_average]
    want = [v.numpy() for v in ref_opt._model_variables_moving_average]
    assert len(ema) == len(want) > 0
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(ema, want)) <= TOL


# ---- precision ------------------------------------------------------------------------

def _scale(opt):
    """The current dynamic loss scale of either engine's LossScaleOptimizer."""
    if hasattr(opt, "loss_scale"):
        return float(opt.loss_scale)
    return float(opt.scale_loss(tf.constant(1.0)))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("policy, tol", [("mixed_bfloat16", 2e-3), ("mixed_float16", 2e-3)])
def test_mixed_precision_matches_large_batch_within_stated_tolerance(engine, policy, tol):
    """Low-precision forward passes round per micro-batch; accumulators are float32.

    Stated tolerance after two SGD updates (weights move by ~0.1): 2e-3 for bfloat16
    and float16 (measured: bf16 ~1e-3, fp16 3e-4 to 9e-4). Both float16 runs start at loss scale 2^4 so that neither skips a
    step (at the default 2^15 the first steps overflow and are skipped).
    """
    keras = get_keras(engine)
    keras.mixed_precision.set_global_policy(policy)
    x, y, sw = _batch(22)

    def optimizer():
        opt = _optimizer(keras, "sgd")
        return loss_scale_optimizer(opt, 16.0) if policy == "mixed_float16" else opt

    model = accumulate(_model(keras), 4)
    model.compile(optimizer=optimizer(), loss=_loss(keras))
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(22)
    model.fit(ds, epochs=2, verbose=0)
    # Large batch through Keras' own train_step.
    plain = _model(keras)
    plain.compile(optimizer=optimizer(), loss=_loss(keras))
    plain.fit(ds, epochs=2, verbose=0)
    assert _max_diff(model.model, _model(keras)) > 1e-2
    assert _max_diff(model.model, plain) <= tol
    if policy == "mixed_float16":
        assert _scale(model.optimizer) == _scale(plain.optimizer) == 16.0  # none skipped


@pytest.mark.parametrize("engine", ENGINES)
def test_float16_window_with_a_non_finite_gradient_is_skipped_whole(engine):
    keras = get_keras(engine)
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y, sw = _batch(16)
    sw[13] = 3e38  # only the last micro-batch overflows once scaled
    model = accumulate(_model(keras), 4)
    model.compile(optimizer=loss_scale_optimizer(_optimizer(keras, "sgd"), 16.0),
                  loss=_loss(keras))
    before = model.model.get_weights()
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(16), verbose=0)
    after = model.model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # nothing applied
    assert _scale(model.optimizer) == 8.0  # halved once, for the whole window
    sw[13] = 1.0
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(16), verbose=0)
    assert _max_diff(model.model, _model(keras)) > 1e-3  # a finite window applies


# ---- BatchNorm ------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_batch_norm_uses_micro_batch_statistics(engine):
    """Documented behaviour: each micro-batch is normalised with its own statistics and
    updates the moving averages (k times per step); the update is the weighted sum of
    those micro-batch gradients, not the large batch's."""
    keras = get_keras(engine)
    x, y, sw = _batch(24)
    k, size = 4, 6
    model, _ = _accumulated(keras, "sgd", x, y, sw, steps=1, k=k, norm="batch")
    manual, opt, loss_fn = _model(keras, norm="batch"), _optimizer(keras, "sgd"), _loss(keras)
    total = None
    for j in range(k):
        s = slice(j * size, (j + 1) * size)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[s], manual(x[s], training=True), sample_weight=sw[s])
        grads = [tf.convert_to_tensor(g) * (size / 24)
                 for g in tape.gradient(loss, manual.trainable_variables)]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    opt.apply_gradients(zip(total, manual.trainable_variables))
    assert _max_diff(model.model, manual) <= TOL  # includes the moving statistics
    large, _, _ = _large_batch(keras, "sgd", x, y, sw, steps=1, norm="batch")
    assert _max_diff(model.model, large) > 1e-5


# ---- serialization --------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_accumulator_config_round_trip_and_fresh_process_load(engine, tmp_path):
    """A saved GradientAccumulator (what a user's ModelCheckpoint writes) loads in a new
    process after `import tf_effitrain`, in both engines."""
    keras = get_keras(engine)
    model = accumulate(_model(keras), 3)
    x, _, _ = _batch(4)
    clone = accumulator_class(keras).from_config(model.get_config())
    assert clone.accumulation_steps == 3
    assert clone.get_config()["accumulation_steps"] == 3
    model(x)
    assert round_trip_in_fresh_process(model, x, tmp_path, engine) == "GradientAccumulator"


def test_a_model_checkpoint_of_the_wrapper_reloads_in_a_fresh_process(tmp_path):
    keras = get_keras("keras3")
    x, y, sw = _batch(8)
    model = accumulate(_model(keras), 2)
    model.compile(optimizer=_optimizer(keras, "adamw"), loss=_loss(keras))
    path = str(tmp_path / "ckpt.keras")
    model.fit(x, y, epochs=1, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path)])
    from harness import run_python

    done = run_python(f"""
        import tf_effitrain
        import keras
        model = keras.models.load_model({path!r})
        print(type(model).__name__, model.accumulation_steps, model.optimizer.iterations.numpy())
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["GradientAccumulator", "2", "1"]


# ---- distribution ---------------------------------------------------------------------

OPTIMIZER_NAMES = ("sgd", "adamw", "lamb", "adafactor")
MW_OPTIMIZERS = ("sgd", "adamw")


@pytest.mark.parametrize("engine, name", [
    *(("keras3", name) for name in OPTIMIZER_NAMES),
    ("tf_keras", "sgd"), ("tf_keras", "adamw")])  # tf_keras sums before clipping itself
def test_mirrored_two_devices_equals_single_device_large_batch(engine, name, mirrored):
    keras = get_keras(engine)
    strategy = mirrored
    x, y, sw = _batch(24)  # 12 examples per replica, 4 micro-batches of 3 on each
    reference, _, _ = _reference_weights(engine, name, 24, 3)
    model, _ = _accumulated(keras, name, x, y, sw, steps=3, k=4, strategy=strategy)
    assert _max_diff(model.model, _model(keras)) > 1e-4
    assert _max_diff(model.model, reference) <= TOL


def test_two_process_multi_worker_equals_single_process_large_batch(tmp_path):
    """Both engines, SGD and AdamW, the Distiller, tfmot pruning and packed rows in one
    two-process cluster run."""
    script = os.path.join(os.path.dirname(__file__), "multiworker_accumulate.py")
    out = str(tmp_path / "weights")
    # SGD and AdamW here; MirroredStrategy covers all four optimizers. The Distiller
    # rides along: one cluster start-up serves both test files.
    for code, log in run_cluster([script, ",".join(ENGINES), out, *MW_OPTIMIZERS,
                                  "distill", "prune", "pack"]):
        assert code == 0, log[-3000:]
    # tfmot pruning (test_pruning.py's model, k=2): both workers hold the same pruned
    # weights, at the target sparsity.
    workers = []
    for index in (0, 1):
        with np.load(f"{out}_tf_keras_prune_{index}.npz") as f:
            workers.append([f[f"arr_{i}"] for i in range(len(f.files))])
    assert _max_diff(*workers) == 0.0
    kernels = [w for w in workers[0] if w.shape in ((32, 32), (32, 64), (64, 32))]
    assert len(kernels) == 12
    assert all(abs(np.mean(k == 0) - 0.8) < 1e-3 for k in kernels)
    # Packed rows (test_packing.py's model, k=2): the plain model's large-batch update.
    import test_packing

    ids, labels, _ = test_packing._examples(20)
    with np.load(f"{out}_keras3_pack.npz") as f:
        weights = [f[f"arr_{i}"] for i in range(len(f.files))]
    reference = test_packing._reference(get_keras("keras3"), ids, labels)
    assert _max_diff(weights, reference) <= test_packing.TOL
    import test_distill

    x, y, sw = _batch(24)
    for engine in ENGINES:
        single, _ = test_distill._distilled(get_keras(engine), x, y, sw, k=1, hidden=True)
        with np.load(f"{out}_{engine}_distill.npz") as f:
            weights = [f[f"arr_{i}"] for i in range(len(f.files))]
        assert _max_diff(weights, _model(get_keras(engine))) > 1e-4
        assert _max_diff(weights, single.student) <= TOL, engine
    for engine in ENGINES:
        initial = _model(get_keras(engine)).get_weights()
        for name in MW_OPTIMIZERS:
            reference, _, _ = _reference_weights(engine, name, 24, 3)
            with np.load(f"{out}_{engine}_{name}.npz") as f:
                weights = [f[f"arr_{i}"] for i in range(len(f.files))]
            assert _max_diff(weights, initial) > 1e-4
            diff = _max_diff(weights, reference)
            assert diff <= TOL, (engine, name, diff)


# ---- tfmot pruning --------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4])
def test_pruning_schedule_advances_once_per_update(k):
    """The mask after update u has the schedule's sparsity at step u, for k=1 and k=4.

    Without the per-micro-batch pin (compress/hooks.py), k=4 runs the schedule 4x too
    fast: 0.579 after the first update instead of 0.253.
    """
    from tf_effitrain.compress import tfmot

    sparsity = tfmot().sparsity.keras
    keras = get_keras("tf_keras")
    x, y, sw = _batch(24)
    updates = 6
    schedule = sparsity.PolynomialDecay(0.0, 0.6, begin_step=0, end_step=updates,
                                        frequency=1)
    model = accumulate(keras.models.clone_model(
        _model(keras),
        clone_function=lambda layer: sparsity.prune_low_magnitude(
            layer, pruning_schedule=schedule)
        if isinstance(layer, keras.layers.Dense) else layer.__class__.from_config(
            layer.get_config())), k)

    def mask_sparsity():
        masks = [mask.numpy() for layer in model.model.layers
                 if hasattr(layer, "pruning_vars") for _, mask, _ in layer.pruning_vars]
        return float(np.mean([np.mean(m == 0) for m in masks]))

    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(mask_sparsity())

    model.compile(optimizer=_optimizer(keras, "adamw", lr=1e-2), loss=_loss(keras))
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(24).repeat()
    model.fit(ds, epochs=2, steps_per_epoch=updates // 2, verbose=0,
              callbacks=[sparsity.UpdatePruningStep(), Record()])
    want = [float(schedule(tf.constant(u, tf.int64))[1]) for u in range(1, updates + 1)]
    # Per-layer rounding of the number of pruned weights: within 0.005.
    np.testing.assert_allclose(seen, want, atol=5e-3)
    steps = {int(layer.pruning_step) for layer in model.model.layers
             if hasattr(layer, "pruning_step")}
    assert steps == {updates} == {int(model.optimizer.iterations)}
