"""Transformer encoder classifier builder, identical in Keras 3 and tf_keras.

Functional model: token ids -> (factorized) embedding + positions -> encoder blocks ->
masked mean pooling -> float32 logits. Projections are plain `Dense` layers so tfmot can
prune and quantize them; sharing is done by calling the same layer objects again.
"""

import numpy as np

from tf_effitrain.config.schema import ModelConfig
from tf_effitrain.engine import get_keras
from tf_effitrain.models.layers import layers_for
from tf_effitrain.models.names import named_layers  # noqa: F401  (re-exported)

__all__ = ["build_transformer_classifier", "count_params", "named_layers"]


def _norm(keras, custom_layers, kind, name):
    # Normalisation runs in float32: fp16 variance overflows, bf16 loses precision.
    if kind == "layer":
        return keras.layers.LayerNormalization(epsilon=1e-6, dtype="float32", name=name)
    if kind == "rms":
        return custom_layers.RMSNormalization(epsilon=1e-6, dtype="float32", name=name)
    return custom_layers.batch_norm(epsilon=1e-5, dtype="float32", name=name)


def _low_rank(cfg):
    """`[(layer name, rank)]` from `cfg.low_rank`'s `"name:rank"` entries."""
    return [(name, int(rank)) for name, _, rank in
            (entry.partition(":") for entry in cfg.low_rank)]


class _Block:
    """One encoder block's layers; calling it again reuses (shares) their weights."""

    def __init__(self, keras, custom_layers, cfg, prefix, index=0):
        ranks = dict(_low_rank(cfg))

        def dense(units, n, **kw):
            name = f"{prefix}_{n}"
            if name in ranks:
                return custom_layers.LowRankDense(units, ranks[name], name=name, **kw)
            return keras.layers.Dense(units, name=name, **kw)

        heads = cfg.layer_heads[index] if cfg.layer_heads else cfg.num_heads
        width = heads * (cfg.d_model // cfg.num_heads)  # fewer heads, same head size
        ffn_dim = cfg.layer_ffn_dims[index] if cfg.layer_ffn_dims else cfg.ffn_dim
        self.cfg = cfg
        self.query = dense(width, "query")
        self.key = dense(width, "key_value" if cfg.shared_kv else "key")
        self.value = self.key if cfg.shared_kv else dense(width, "value")
        self.attention = custom_layers.SelfAttentionCore(
            heads,
            attention=cfg.attention,
            window=cfg.window,
            block_size=cfg.block_size,
            name=f"{prefix}_attention",
        )
        self.attention_output = dense(cfg.d_model, "attention_output")
        self.ffn_inner = dense(ffn_dim, "ffn_inner", activation=cfg.activation)
        self.ffn_output = dense(cfg.d_model, "ffn_output")
        self.norm1 = _norm(keras, custom_layers, cfg.norm, f"{prefix}_attention_norm")
        self.norm2 = _norm(keras, custom_layers, cfg.norm, f"{prefix}_ffn_norm")
        self.dropout1 = keras.layers.Dropout(cfg.dropout)
        self.dropout2 = keras.layers.Dropout(cfg.dropout)

    def _normed(self, norm, x, mask):
        return norm(x, mask=mask) if self.cfg.norm == "batch" else norm(x)

    def _attend(self, x, mask):
        kv = self.key(x)
        v = kv if self.cfg.shared_kv else self.value(x)
        out = self.attention([self.query(x), kv, v, mask])
        return self.dropout1(self.attention_output(out))

    def _ffn(self, x):
        return self.dropout2(self.ffn_output(self.ffn_inner(x)))

    def __call__(self, x, mask):
        if self.cfg.norm_position == "pre":
            x = x + self._attend(self._normed(self.norm1, x, mask), mask)
            return x + self._ffn(self._normed(self.norm2, x, mask))
        x = self._normed(self.norm1, x + self._attend(x, mask), mask)
        return self._normed(self.norm2, x + self._ffn(x), mask)


def _embed(keras, custom_layers, cfg, token_ids, vocab_size, max_length):
    if cfg.embedding_rank:
        # Factorized (ALBERT): vocab x rank + rank x d_model instead of vocab x d_model.
        x = keras.layers.Embedding(vocab_size, cfg.embedding_rank, name="token_embedding")(
            token_ids
        )
        x = keras.layers.Dense(cfg.d_model, use_bias=False, name="embedding_projection")(x)
    else:
        x = keras.layers.Embedding(vocab_size, cfg.d_model, name="token_embedding")(token_ids)
    x = custom_layers.PositionEmbedding(max_length, name="position_embedding")(x)
    return keras.layers.Dropout(cfg.dropout, name="embedding_dropout")(x)


def _build_bert_backbone(keras, cfg, token_ids, mask, vocab_size, max_length):
    import keras_hub  # Keras 3 only; imported here so tf_keras runs never load it.

    if cfg.preset:
        backbone = keras_hub.models.BertBackbone.from_preset(cfg.preset)
        if backbone.vocabulary_size < vocab_size:
            raise ValueError(
                f"The preset at {cfg.preset!r} has vocabulary_size="
                f"{backbone.vocabulary_size}, smaller than the tokenizer's {vocab_size}: "
                "token ids would be out of range. Use the preset's own vocabulary or a "
                "smaller `data.vocab_size`."
            )
    else:
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=vocab_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            hidden_dim=cfg.d_model,
            intermediate_dim=cfg.ffn_dim,
            dropout=cfg.dropout,
            max_sequence_length=max_length,
        )
    outputs = backbone(
        {
            "token_ids": token_ids,
            "segment_ids": keras.ops.zeros_like(token_ids),
            "padding_mask": keras.ops.cast(mask, "int32"),
        }
    )
    return outputs["pooled_output"]


def build_transformer_classifier(
    cfg, vocab_size, num_classes, max_length, keras=None, name="transformer_classifier"
):
    """Builds a Transformer encoder classifier from a `ModelConfig`.

    Args:
        cfg: `ModelConfig` (or a dict of its fields).
        vocab_size: int. Token ids must lie in `[0, vocab_size)`; 0 is padding.
        num_classes: int. Width of the logits.
        max_length: int. Longest sequence (size of the position table).
        keras: the engine's `keras` module (`get_keras("keras3" | "tf_keras")`);
            default Keras 3.
        name: str. Model name.

    Returns:
        A functional model mapping int32 token ids (batch, seq) to float32 logits
        (batch, num_classes).

    Example:

    ```python
    cfg = et.ModelConfig(num_layers=4, d_model=256, num_heads=8, ffn_dim=1024,
                         attention="local", window=32, shared_kv=True)
    model = et.build_transformer_classifier(cfg, vocab_size=8000, num_classes=6,
                                            max_length=128, keras=et.get_keras("tf_keras"))
    ```
    """
    if isinstance(cfg, dict):
        cfg = ModelConfig(**cfg)
    cfg.validate()
    keras = keras or get_keras("keras3")
    for arg, value in (("vocab_size", vocab_size), ("num_classes", num_classes),
                       ("max_length", max_length)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"`{arg}` must be an integer >= 2. Received: {arg}={value!r}")
    if cfg.kind == "bert_backbone" and (cfg.layer_heads or cfg.layer_ffn_dims or cfg.low_rank):
        raise ValueError("`layer_heads`, `layer_ffn_dims` and `low_rank` apply to "
                         "`kind: transformer` only (keras-hub's BertBackbone has uniform "
                         "layers).")
    custom_layers = layers_for(keras)
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    mask = custom_layers.PaddingMask(name="padding_mask")(token_ids)
    if cfg.kind == "bert_backbone":
        pooled = _build_bert_backbone(keras, cfg, token_ids, mask, vocab_size, max_length)
    else:
        x = _embed(keras, custom_layers, cfg, token_ids, vocab_size, max_length)
        blocks = [_Block(keras, custom_layers, cfg, "shared_block")] if cfg.share_layers else [
            _Block(keras, custom_layers, cfg, f"block{i}", i) for i in range(cfg.num_layers)
        ]
        for i in range(cfg.num_layers):
            x = blocks[i % len(blocks)](x, mask)
        if cfg.norm_position == "pre":
            x = _norm(keras, custom_layers, cfg.norm, "final_norm")(x) if cfg.norm != "batch" else (
                _norm(keras, custom_layers, cfg.norm, "final_norm")(x, mask=mask)
            )
        pooled = custom_layers.MaskedMeanPooling(name="pooling")([x, mask])
    # The logits head stays float32 under mixed precision: the loss needs full range.
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(pooled)
    model = keras.Model(token_ids, logits, name=name)
    unknown = sorted({n for n, _ in _low_rank(cfg)} - {layer.name for layer in model.layers})
    if unknown:
        raise ValueError(
            f"`low_rank` names layers the model does not have: {unknown}. Dense layers: "
            f"{[l.name for l in model.layers if type(l).__name__ == 'Dense']}")
    return model


def count_params(model):
    """Trainable and total parameter counts of a built model, as a dict."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return {"trainable": trainable, "total": int(model.count_params())}
