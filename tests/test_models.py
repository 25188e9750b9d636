import numpy as np
import pytest
import tensorflow as tf

from tf_effitrain.config import ModelConfig
from tf_effitrain.engine import get_keras
from tf_effitrain.models import build_transformer_classifier, count_params, layers_for
from tf_effitrain.models.layers import (
    attention_bias_reference,
    block_sparse_attention,
    full_attention,
    local_attention,
)

from harness import ENGINES, round_trip_in_fresh_process

VOCAB, CLASSES, MAXLEN = 97, 3, 48
SMALL = dict(d_model=32, num_heads=4, ffn_dim=48, num_layers=2, dropout=0.0)


def _ids(batch=3, seq=29, seed=0):
    ids = np.random.RandomState(seed).randint(1, VOCAB, size=(batch, seq)).astype("int32")
    ids[0, 17:] = 0  # one padded row
    return ids


def _build(engine="keras3", **kw):
    cfg = ModelConfig(**{**SMALL, **kw})
    return build_transformer_classifier(cfg, VOCAB, CLASSES, MAXLEN, keras=get_keras(engine))


# ---- attention patterns ---------------------------------------------------------------

def _reference_attention(q, k, v, allowed):
    scores = tf.matmul(q, k, transpose_b=True) + (1.0 - allowed[:, None]) * -1e9
    return tf.matmul(tf.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("seq", [1, 7, 16, 37])
@pytest.mark.parametrize("kind, size", [("local", 1), ("local", 5), ("local", 16),
                                        ("block_sparse", 4), ("block_sparse", 16), ("full", None)])
def test_efficient_attention_equals_masked_dense_attention(kind, size, seq):
    rng = np.random.RandomState(seq)
    q, k, v = (tf.constant(rng.randn(2, 2, seq, 8), tf.float32) for _ in range(3))
    mask = np.ones((2, seq), "float32")
    mask[1, seq // 2 + 1:] = 0.0
    mask = tf.constant(mask)
    if kind == "local":
        got = local_attention(q, k, v, mask, size)
        allowed = attention_bias_reference(mask, "local", window=size)
    elif kind == "block_sparse":
        got = block_sparse_attention(q, k, v, mask, size)
        allowed = attention_bias_reference(mask, "block_sparse", block_size=size)
    else:
        got = full_attention(q, k, v, mask)
        allowed = attention_bias_reference(mask, "full")
    want = _reference_attention(q, k, v, allowed)
    # Compare real-token query rows (padded query rows are pooled out by the model).
    keep = mask.numpy().astype(bool)
    np.testing.assert_allclose(
        np.transpose(got.numpy(), (0, 2, 1, 3))[keep],
        np.transpose(want.numpy(), (0, 2, 1, 3))[keep], atol=2e-6)


def test_wide_local_window_equals_full_attention():
    ids = _ids()
    full = _build(attention="full")
    local = _build(attention="local", window=64)
    local.set_weights(full.get_weights())
    np.testing.assert_allclose(local(ids).numpy(), full(ids).numpy(), atol=1e-5)


# ---- builder options --------------------------------------------------------------------

OPTIONS = [
    {},
    {"norm": "batch"},
    {"norm": "rms"},
    {"norm_position": "post"},
    {"norm": "batch", "norm_position": "post"},
    {"share_layers": True},
    {"shared_kv": True},
    {"embedding_rank": 8},
    {"attention": "local", "window": 4},
    {"attention": "block_sparse", "block_size": 8},
    {"activation": "relu", "num_layers": 1},
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_option_builds_runs_and_trains(engine, options):
    keras = get_keras(engine)
    model = _build(engine, **options)
    logits = model(_ids(), training=False)
    assert logits.shape == (3, CLASSES)
    assert logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()
    # One gradient step reaches every trainable weight (nothing disconnected).
    ids = _ids()
    with tf.GradientTape() as tape:
        out = model(ids, training=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            np.array([0, 1, 2]), out)
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [w.name for w, g in zip(model.trainable_weights, grads) if g is None]
    assert not missing


@pytest.mark.parametrize("options", [{}, {"attention": "local", "window": 3},
                                     {"attention": "block_sparse", "block_size": 4},
                                     {"norm": "batch"}, {"norm": "rms"}])
def test_padding_does_not_change_the_prediction(options):
    model = _build(**options)
    ids = _ids(batch=2, seq=13)
    padded = np.concatenate([ids, np.zeros((2, 19), "int32")], axis=1)
    np.testing.assert_allclose(model(padded).numpy(), model(ids).numpy(), atol=1e-5)


def test_share_layers_really_shares():
    shared = count_params(_build(share_layers=True, num_layers=6))["trainable"]
    one_layer = count_params(_build(num_layers=1))["trainable"]
    six_layers = count_params(_build(num_layers=6))["trainable"]
    assert shared == one_layer
    d, f = SMALL["d_model"], SMALL["ffn_dim"]
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    assert six_layers - one_layer == 5 * block


def test_shared_kv_removes_one_projection_per_layer():
    d = SMALL["d_model"]
    base = count_params(_build())["trainable"]
    shared = count_params(_build(shared_kv=True))["trainable"]
    assert base - shared == SMALL["num_layers"] * (d * d + d)


def test_factorized_embedding_reduces_parameters():
    d, r = SMALL["d_model"], 8
    base = count_params(_build())["trainable"]
    factorized = count_params(_build(embedding_rank=r))["trainable"]
    assert base - factorized == VOCAB * d - (VOCAB * r + r * d)
    assert factorized < base


def test_batch_norm_adds_non_trainable_statistics():
    params = count_params(_build(norm="batch"))
    # LayerNorm/RMS have none; BatchNorm has moving mean and variance per norm.
    norms = 2 * SMALL["num_layers"] + 1
    assert params["total"] - params["trainable"] == norms * 2 * SMALL["d_model"]


def test_logits_and_norms_stay_float32_under_mixed_precision():
    keras = get_keras("keras3")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = _build()
    assert model.get_layer("block0_query").compute_dtype == "bfloat16"
    assert model.get_layer("block0_attention_norm").compute_dtype == "float32"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model(_ids()).dtype == tf.float32


@pytest.mark.parametrize("options", [{}, {"norm": "batch", "embedding_rank": 8, "shared_kv": True},
                                     {"norm": "rms", "share_layers": True,
                                      "attention": "local", "window": 4}])
def test_engines_give_identical_weight_layouts(options):
    k3 = _build("keras3", **options)
    tk = _build("tf_keras", **options)
    assert [w.shape for w in k3.get_weights()] == [w.shape for w in tk.get_weights()]
    assert [w.path.split("/")[-2] for w in k3.weights] == [
        w.name.split("/")[-2] for w in tk.weights]
    tk.set_weights(k3.get_weights())
    ids = _ids()
    np.testing.assert_allclose(tk(ids).numpy(), k3(ids).numpy(), atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_saved_model_reloads_in_a_fresh_process(engine, tmp_path):
    """Every custom layer is registered by `import tf_effitrain` alone."""
    model = _build(engine, norm="rms", attention="block_sparse", block_size=8,
                   embedding_rank=8)
    assert round_trip_in_fresh_process(model, _ids(), tmp_path, engine) == "Functional"


@pytest.mark.parametrize("engine", ENGINES)
def test_custom_layers_get_config_round_trip(engine):
    custom = layers_for(get_keras(engine))
    for layer in (custom.PaddingMask(pad_id=3), custom.PositionEmbedding(17, initializer_range=0.1),
                  custom.RMSNormalization(epsilon=1e-3),
                  custom.SelfAttentionCore(4, attention="local", window=5, block_size=7),
                  custom.MaskedMeanPooling()):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()


def test_attention_kind_is_validated():
    custom = layers_for(get_keras("keras3"))
    with pytest.raises(ValueError, match="`attention` must be one of"):
        custom.SelfAttentionCore(2, attention="sparse")


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="`vocab_size` must be an integer >= 2"):
        build_transformer_classifier(ModelConfig(**SMALL), 0, 3, 16)


def test_bert_backbone_random_init_and_local_preset(tmp_path):
    import keras_hub

    cfg = ModelConfig(kind="bert_backbone", **SMALL)
    model = build_transformer_classifier(cfg, VOCAB, CLASSES, MAXLEN)
    assert model(_ids()).shape == (3, CLASSES)
    assert count_params(model)["trainable"] > 0
    # A local preset directory (no download): save a tiny backbone, build from it.
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=MAXLEN)
    preset = str(tmp_path / "preset")
    backbone.save_to_preset(preset)
    from_preset = build_transformer_classifier(
        ModelConfig(kind="bert_backbone", preset=preset, **SMALL), VOCAB, CLASSES, MAXLEN)
    assert from_preset(_ids()).shape == (3, CLASSES)
    bert = [layer for layer in from_preset.layers if "bert" in layer.name.lower()][0]
    np.testing.assert_array_equal(bert.get_weights()[0], backbone.get_weights()[0])
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_transformer_classifier(
            ModelConfig(kind="bert_backbone", preset=preset, **SMALL), VOCAB + 50, CLASSES,
            MAXLEN)
