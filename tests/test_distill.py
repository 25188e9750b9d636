"""Knowledge distillation: the loss against NumPy, the Distiller's update under
accumulation, MirroredStrategy, mixed precision and tfmot pruning, precomputed teacher
logits, the saved student, and the `distillation:` section / `tf-effitrain distill`."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from harness import ENGINES, REPO, max_abs_diff, round_trip_in_fresh_process, tiny_config
from test_accumulation import CLASSES, SEQ, VOCAB, _batch, _loss, _model, _optimizer
from tf_effitrain.config import ConfigError, ModelConfig, load_config
from tf_effitrain.distill import (
    TEACHER_LOGITS,
    distillation_loss,
    distiller,
    load_teacher,
    teacher_logits,
)
from tf_effitrain.engine import get_keras
from tf_effitrain.errors import DataError, RunDirError
from tf_effitrain.models import build_transformer_classifier

TOL = 1e-6


def _teacher(keras, seed=7):
    keras.utils.set_random_seed(seed)
    cfg = ModelConfig(d_model=24, num_heads=2, ffn_dim=32, num_layers=1, dropout=0.0)
    return build_transformer_classifier(cfg, VOCAB, CLASSES, 16, keras=keras)


def _numpy_loss(labels, student, teacher, alpha, temperature, sample_weight, t2=True):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -log_softmax(student)[np.arange(len(labels)), labels]
    log_t, log_s = log_softmax(teacher / temperature), log_softmax(student / temperature)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1) * (temperature ** 2 if t2 else 1.0)
    w = np.ones(len(labels)) if sample_weight is None else sample_weight
    return alpha * (w * ce).mean() + (1 - alpha) * (w * kl).mean()


def _logits(n=12, seed=3):
    rng = np.random.RandomState(seed)
    return (rng.randint(0, CLASSES, n).astype("int32"),
            rng.normal(0, 3, (n, CLASSES)).astype("float32"),
            rng.normal(0, 3, (n, CLASSES)).astype("float32"),
            rng.uniform(0.2, 2.0, n).astype("float32"))


@pytest.mark.parametrize("t2", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_loss_equals_numpy_reference(t2, weighted):
    y, s, t, w = _logits()
    w = w if weighted else None
    for alpha, temperature in ((0.5, 2.0), (0.1, 5.0), (1.0, 1.0), (0.0, 0.7)):
        want = _numpy_loss(y, s.astype(np.float64), t.astype(np.float64), alpha,
                           temperature, w, t2)
        got = float(distillation_loss(y, s, t, alpha, temperature, w, scale_by_t2=t2))
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (alpha, temperature)


@pytest.mark.parametrize("engine", ENGINES)
def test_distiller_loss_is_the_reference_with_compiled_loss(engine):
    """The Distiller's micro-batch loss (compiled student loss + soft-target term) for
    given logits, T, alpha and sample weights equals the NumPy formula."""
    keras = get_keras(engine)
    y, s, t, w = _logits()
    model = distiller(_model(keras), _teacher(keras), alpha=0.3, temperature=4.0)
    model.compile(optimizer="sgd", loss=_loss(keras))
    x = {"token_ids": np.ones((12, SEQ), "int32"), TEACHER_LOGITS: t}
    got = float(model.compute_micro_loss(x, tf.constant(y), tf.constant(s),
                                         tf.constant(w)))
    want = _numpy_loss(y, s.astype(np.float64), t.astype(np.float64), 0.3, 4.0, w)
    assert abs(got - want) <= 1e-5 * abs(want)


@pytest.mark.parametrize("engine", ENGINES)
def test_regularization_is_not_weighted_by_alpha(engine):
    """alpha weights the label loss only; the student's own regularization stays whole."""
    keras = get_keras(engine)
    y, s, t, w = _logits()
    inputs = keras.Input(shape=(SEQ,), dtype="int32", name="token_ids")
    hidden = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 4)(inputs))
    head = keras.layers.Dense(CLASSES, name="logits",
                              kernel_regularizer=keras.regularizers.L2(0.5))
    student = keras.Model(inputs, head(hidden))
    model = distiller(student, _teacher(keras), alpha=0.3, temperature=2.0)
    model.compile(optimizer="sgd", loss=_loss(keras))
    x = {"token_ids": np.ones((12, SEQ), "int32"), TEACHER_LOGITS: t}
    got = float(model.compute_micro_loss(x, tf.constant(y), tf.constant(s), tf.constant(w)))
    l2 = 0.5 * float(np.sum(np.square(np.asarray(head.kernel))))
    want = _numpy_loss(y, s.astype(np.float64), t.astype(np.float64), 0.3, 2.0, w) + l2
    assert abs(got - want) <= 1e-5 * abs(want)


def _distilled(keras, x, y, sw, steps=2, k=1, strategy=None, options=None, name="adamw",
               hidden=False, precomputed=False, student=None, alpha=0.4):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        teacher = _teacher(keras)
        model = distiller(student or _model(keras), teacher, alpha=alpha, temperature=3.0,
                          accumulation_steps=k,
                          hidden_layers=[["final_norm", "final_norm"]] if hidden else None)
        model.compile(optimizer=_optimizer(keras, name), loss=_loss(keras),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    inputs = x
    if precomputed:
        inputs = {"token_ids": x, TEACHER_LOGITS: teacher.predict(x, verbose=0)}
    ds = tf.data.Dataset.from_tensor_slices((inputs, y, sw)).batch(len(x)).repeat()
    if options is not None:
        ds = ds.with_options(options)
    before = teacher.get_weights()
    history = model.fit(ds, epochs=steps, steps_per_epoch=1, verbose=0, shuffle=False)
    assert max_abs_diff(teacher.get_weights(), before) == 0.0  # the teacher is frozen
    return model, history


@pytest.mark.parametrize("engine", ENGINES)
def test_accumulated_distillation_equals_one_large_batch(engine):
    """k=4 micro-batches give the k=1 update: the teacher's soft-target and hidden-state
    terms are in every one."""
    keras = get_keras(engine)
    x, y, sw = _batch(24)
    one, history = _distilled(keras, x, y, sw, k=1, hidden=True)
    four, _ = _distilled(keras, x, y, sw, k=4, hidden=True)
    assert max_abs_diff(one.student, _model(keras)) > 1e-4  # it trained
    assert history.history["kd_loss"][0] > 0
    assert len(one.projections) == 1 and one.projections[0] is not None  # 16 -> 24
    assert max_abs_diff(one, four) <= TOL  # student, teacher and projection


def test_alpha_one_is_plain_training():
    """alpha=1: the teacher's term has no weight; the update is the accumulator's."""
    from tf_effitrain.training.accumulation import accumulate

    keras = get_keras("keras3")
    x, y, sw = _batch(24)
    model, _ = _distilled(keras, x, y, sw, k=2, alpha=1.0)
    plain = accumulate(_model(keras), 2)
    plain.compile(optimizer=_optimizer(keras, "adamw"), loss=_loss(keras))
    plain.fit(tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(24).repeat(), epochs=2,
              steps_per_epoch=1, verbose=0)
    assert max_abs_diff(model.student, plain.model) <= TOL


@pytest.mark.parametrize("engine", ENGINES)
def test_precomputed_logits_give_the_live_teachers_update(engine):
    keras = get_keras(engine)
    x, y, sw = _batch(24)
    live, _ = _distilled(keras, x, y, sw, k=2)
    cached, _ = _distilled(keras, x, y, sw, k=2, precomputed=True)
    assert max_abs_diff(live.student, cached.student) <= TOL


@pytest.mark.parametrize("engine", ENGINES)
def test_mirrored_two_devices_equal_one_device(engine, mirrored):
    keras = get_keras(engine)
    x, y, sw = _batch(24)  # 12 per replica, 4 micro-batches of 3 on each
    single, _ = _distilled(keras, x, y, sw, k=1, hidden=True)
    two, _ = _distilled(keras, x, y, sw, k=4, hidden=True, strategy=mirrored)
    assert max_abs_diff(single.student, _model(keras)) > 1e-4
    assert max_abs_diff(single, two) <= TOL


@pytest.mark.parametrize("engine, policy", [("keras3", "mixed_bfloat16"),
                                            ("keras3", "mixed_float16"),
                                            ("tf_keras", "mixed_float16")])
def test_mixed_precision_computes_the_loss_in_float32(engine, policy):
    from tf_effitrain.engine import ops_for

    keras = get_keras(engine)
    x, y, sw = _batch(24)
    reference, _ = _distilled(keras, x, y, sw, k=2, name="sgd")
    keras.mixed_precision.set_global_policy(policy)
    student = _model(keras)
    with tf.distribute.get_strategy().scope():
        teacher = _teacher(keras)
        model = distiller(student, teacher, alpha=0.4, temperature=3.0, accumulation_steps=2)
        optimizer = _optimizer(keras, "sgd")
        if policy == "mixed_float16":
            optimizer = ops_for(keras).loss_scale_optimizer(optimizer, 2.0 ** 10)
        model.compile(optimizer=optimizer, loss=_loss(keras))
    loss = model.compute_micro_loss(
        {"token_ids": x, TEACHER_LOGITS: teacher.predict(x, verbose=0)}, tf.constant(y),
        student(x), tf.constant(sw))
    assert loss.dtype == tf.float32
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(24).repeat(), epochs=2,
              steps_per_epoch=1, verbose=0)
    diff = max_abs_diff(model.student, reference.student)
    assert np.isfinite(diff) and diff <= 0.05, diff  # low-precision compute, same update
    assert max_abs_diff(model.student, _model(get_keras(engine))) > 1e-3


def test_pruned_student_in_tf_keras():
    """A tfmot-pruned student (tf_keras) learns from the teacher with accumulation; the
    mask follows the schedule per applied update, then strips to a plain model."""
    from tf_effitrain.compress import tfmot

    keras = get_keras("tf_keras")
    sparsity = tfmot().sparsity.keras
    schedule = sparsity.ConstantSparsity(0.5, begin_step=0, frequency=1)

    def prune_dense(layer):
        if isinstance(layer, keras.layers.Dense):
            return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    student = keras.models.clone_model(_model(keras), clone_function=prune_dense)
    x, y, sw = _batch(24)
    with tf.distribute.get_strategy().scope():
        model = distiller(student, _teacher(keras), alpha=0.4, temperature=3.0,
                          accumulation_steps=4)
        model.compile(optimizer=_optimizer(keras, "adamw"), loss=_loss(keras))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(24).repeat(), epochs=3,
              steps_per_epoch=1, verbose=0, callbacks=[sparsity.UpdatePruningStep()])
    stripped = sparsity.strip_pruning(model.student)
    kernels = [layer.kernel.numpy() for layer in stripped.layers
               if isinstance(layer, keras.layers.Dense)]
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert abs(zeros - 0.5) <= 0.01, zeros
    steps = [int(v.numpy()) for v in model.student.variables if "pruning_step" in v.name]
    assert steps and set(steps) == {3}  # 3 updates, not 12 micro-batch calls


@pytest.mark.parametrize("engine", ENGINES)
def test_distiller_round_trips_in_a_fresh_process(engine, tmp_path):
    keras = get_keras(engine)
    model = distiller(_model(keras), _teacher(keras), alpha=0.2, temperature=1.5,
                      accumulation_steps=3, hidden_layers=[["final_norm", "final_norm"]])
    config = model.get_config()
    assert (config["alpha"], config["temperature"], config["accumulation_steps"],
            config["hidden_layers"]) == (0.2, 1.5, 3, [["final_norm", "final_norm"]])
    assert round_trip_in_fresh_process(model, _batch(4)[0], tmp_path, engine) == "Distiller"


def test_a_trained_distiller_reloads_with_its_optimizer_state(tmp_path):
    keras = get_keras("keras3")
    x, y, sw = _batch(24)
    model, _ = _distilled(keras, x, y, sw, k=2, hidden=True)
    assert model.built and model.count_params() > 0
    path = str(tmp_path / "distiller.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    assert max_abs_diff(loaded, model) == 0.0
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)


def test_bad_arguments_fail_with_keras_style_errors():
    keras = get_keras("keras3")
    student, teacher = _model(keras), _teacher(keras)
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\]. "
                                         r"Received: alpha=1.5"):
        distiller(student, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
        distiller(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="has no layer 'nope'.*Its layers"):
        distiller(student, teacher, hidden_layers=[["nope", "final_norm"]])
    with pytest.raises(ValueError, match="same Keras engine"):
        distiller(student, _teacher(get_keras("tf_keras")))
    keras.utils.set_random_seed(0)
    other = build_transformer_classifier(ModelConfig(d_model=8, num_heads=2, ffn_dim=8,
                                                     num_layers=1), VOCAB, CLASSES + 1, 16)
    with pytest.raises(ValueError, match="same classes"):
        distiller(student, other)


@pytest.mark.parametrize("options", [{}, {"shared_kv": True, "embedding_rank": 8},
                                     {"share_layers": True, "norm_position": "post"}])
def test_named_layers_match_the_builder(options):
    """The names checked before a run (hidden-state pairs) are the built model's."""
    from tf_effitrain.models.names import named_layers

    cfg = ModelConfig(d_model=16, num_heads=2, ffn_dim=16, num_layers=2, **options)
    model = build_transformer_classifier(cfg, VOCAB, CLASSES, 16)
    built = {layer.name for layer in model.layers}
    assert set(named_layers(cfg)) <= built
    unnamed = {n for n in built - set(named_layers(cfg))
               if not n.startswith(("add", "dropout"))}
    assert not unnamed, unnamed


def test_tpu_check_reads_token_ids_of_dict_inputs(small_jsonl, tmp_path):
    from tf_effitrain.data import prepare_data
    from tf_effitrain.runtime.tpu_check import check_tpu_readiness

    config = tiny_config(small_jsonl, str(tmp_path), "data.batching=fixed",
                         "data.drop_remainder=true")
    data = prepare_data(config.data, run_dir=str(tmp_path), train_batch_size=8,
                        train_features=lambda ds: {TEACHER_LOGITS: np.zeros(
                            (sum(1 for _ in ds), 3), np.float32)})
    assert check_tpu_readiness(config, data.train) == []


def test_teacher_logits_come_back_in_example_order():
    keras = get_keras("keras3")
    teacher = _teacher(keras)
    rng = np.random.RandomState(0)
    rows = [rng.randint(1, VOCAB, size=rng.randint(1, 16)).astype("int32") for _ in range(37)]
    ds = tf.data.Dataset.from_generator(
        lambda: ((r, np.int32(0)) for r in rows),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)))
    got = teacher_logits(teacher, ds, batch_size=8, max_length=16)
    want = np.concatenate([teacher.predict(r[None], verbose=0) for r in rows])
    assert got.shape == (37, CLASSES)
    assert float(np.max(np.abs(got - want))) <= 1e-5  # padding never changes a prediction


def test_precomputed_features_refuse_token_shuffle(small_jsonl, tmp_path):
    from tf_effitrain.data import prepare_data

    config = tiny_config(small_jsonl, str(tmp_path), "data.token_shuffle=0.2")
    with pytest.raises(DataError, match="token_shuffle"):
        prepare_data(config.data, run_dir=str(tmp_path),
                     train_features=lambda ds: {"x": np.zeros((1, 1))})
    with pytest.raises(ConfigError, match="precompute_teacher: true` cannot be used"):
        load_config(None, ["distillation.teacher=runs/t", "data.token_shuffle=0.1",
                           "distillation.precompute_teacher=true"])


# ---- a finished run as teacher -----------------------------------------------------------

DISTILL_CONFIG = os.path.join(REPO, "configs", "distill_demo.yaml")


def _student_overrides(finished_run, shared_jsonl, run_dir, *more):
    teacher_run = finished_run[1].run_dir
    teacher = load_config(os.path.join(teacher_run, "config.yaml"))
    return [f"data.path={shared_jsonl}", f"training.run_dir={run_dir}",
            f"data.vocab_size={teacher.data.vocab_size}",
            f"data.max_length={teacher.data.max_length}",
            f"distillation.teacher={teacher_run}", "model.d_model=8", "model.num_heads=2",
            "model.ffn_dim=16", "model.num_layers=1", "model.embedding_rank=4",
            "training.epochs=2", "training.verbose=0", "runtime.precision=float32",
            "data.batch_size=16", *more]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tf_effitrain.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_distill_cli_saves_only_the_student(finished_run, shared_jsonl, tmp_path):
    """`tf-effitrain distill`: the student learns from the finished run, `model.keras`
    holds the student alone, reloads, and exports like any run."""
    run_dir = str(tmp_path / "student")
    sets = _student_overrides(finished_run, shared_jsonl, run_dir,
                              "export.quantize=[dynamic]", "export.delegates=[none]")
    done = _cli("distill", DISTILL_CONFIG, *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr[-3000:]

    keras = get_keras("keras3")
    student = keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    teacher_run = finished_run[1].run_dir
    teacher = keras.models.load_model(os.path.join(teacher_run, "model.keras"),
                                      compile=False)
    assert student.count_params() < teacher.count_params() / 4
    with zipfile.ZipFile(os.path.join(run_dir, "model.keras")) as z:
        config = json.loads(z.read("config.json"))
        assert config["class_name"] == "Functional"  # not a Distiller: no teacher inside
        z.extract("model.weights.h5", str(tmp_path))
    import h5py

    arrays = []
    with h5py.File(str(tmp_path / "model.weights.h5")) as f:
        f.visititems(lambda name, obj: arrays.append(obj.size)
                     if isinstance(obj, h5py.Dataset) else None)
    assert len(arrays) == len(student.weights) and sum(arrays) == student.count_params()
    with open(os.path.join(teacher_run, "vocab.txt"), encoding="utf-8") as a, open(
            os.path.join(run_dir, "vocab.txt"), encoding="utf-8") as b:
        assert a.read() == b.read()  # the teacher's token ids
    report = open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    assert "## Distillation" in report and "holds the student only" in report
    assert "computed once before training" in report  # precomputed: no token shuffle
    export = json.load(open(os.path.join(run_dir, "export_report.json")))
    assert export["files"], export


def test_distill_refuses_other_splits_and_missing_teachers(finished_run, shared_jsonl,
                                                           tmp_path):
    run_dir = str(tmp_path / "student")
    sets = _student_overrides(finished_run, shared_jsonl, run_dir, "runtime.seed=7",
                              "data.test_fraction=0.2")
    done = _cli("distill", DISTILL_CONFIG, *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 2
    assert "data.test_fraction=0.2 (teacher: 0.1)" in done.stderr
    assert "runtime.seed=7 (teacher: 42)" in done.stderr and "Traceback" not in done.stderr
    done = _cli("distill", DISTILL_CONFIG, "--set", f"distillation.teacher={tmp_path}/none",
                "--set", f"training.run_dir={run_dir}")
    assert done.returncode == 2 and "not found" in done.stderr
    done = _cli("distill", DISTILL_CONFIG, "--set", "distillation.teacher=",
                "--set", f"training.run_dir={run_dir}")
    assert done.returncode == 2 and "distillation.teacher" in done.stderr
    assert not os.path.exists(run_dir)  # nothing written before the inputs are valid

    # The teacher's own directory through --run-dir: refused, the teacher untouched.
    teacher_run = finished_run[1].run_dir
    before = {n: open(os.path.join(teacher_run, n), "rb").read()
              for n in ("config.yaml", "metrics.jsonl", "vocab.txt")}
    sets = _student_overrides(finished_run, shared_jsonl, run_dir,
                              "distillation.hidden_layers=[[final_nrm, final_norm]]")
    done = _cli("distill", DISTILL_CONFIG, *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 2 and "student layer(s) ['final_nrm']" in done.stderr
    done = _cli("distill", DISTILL_CONFIG, "--run-dir", teacher_run,
                *[a for s in sets[:-1] for a in ("--set", s)])
    assert done.returncode == 2 and "the student would overwrite its teacher" in done.stderr
    assert before == {n: open(os.path.join(teacher_run, n), "rb").read() for n in before}
    assert not os.path.exists(run_dir)


def test_teacher_moves_between_engines(finished_run):
    keras3, tf_keras = get_keras("keras3"), get_keras("tf_keras")
    x = _batch(6)[0]
    a = load_teacher(finished_run[1].run_dir, keras3)
    b = load_teacher(finished_run[1].run_dir, tf_keras)
    assert type(b).__module__.startswith("tf_keras") and not b.trainable
    assert float(np.max(np.abs(a.predict(x, verbose=0) - b.predict(x, verbose=0)))) <= 1e-5


def test_unfinished_teacher_run_is_reported(tmp_path):
    from tf_effitrain.distill import check_teacher_run

    with pytest.raises(RunDirError, match="config.yaml' not found"):
        check_teacher_run(str(tmp_path), load_config(None, []))
