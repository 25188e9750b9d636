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
        # The toolkit's exact GELU: the same function as Keras' "gelu", a cheaper gradient.
        activation = custom_layers.gelu if cfg.activation == "gelu" else cfg.activation
        self.ffn_inner = dense(ffn_dim, "ffn_inner", activation=activation)
        self.ffn_output = dense(cfg.d_model, "ffn_output")
        self.norm1 = _norm(keras, custom_layers, cfg.norm, f"{prefix}_attention_norm")
        self.norm2 = _norm(keras, custom_layers, cfg.norm, f"{prefix}_ffn_norm")
        self.dropout1 = keras.layers.Dropout(cfg.dropout)
        self.dropout2 = keras.layers.Dropout(cfg.dropout)

    def _normed(self, norm, x, mask):
        return norm(x, mask=mask) if self.cfg.norm == "batch" else norm(x)

    def _attend(self, x, mask, segments):
        kv = self.key(x)
        v = kv if self.cfg.shared_kv else self.value(x)
        extra = [] if segments is None else [segments]
        out = self.attention([self.query(x), kv, v, mask, *extra])
        return self.dropout1(self.attention_output(out))

    def _ffn(self, x):
        return self.dropout2(self.ffn_output(self.ffn_inner(x)))

    def __call__(self, x, mask, segments=None):
        if self.cfg.norm_position == "pre":
            x = x + self._attend(self._normed(self.norm1, x, mask), mask, segments)
            return x + self._ffn(self._normed(self.norm2, x, mask))
        x = self._normed(self.norm1, x + self._attend(x, mask, segments), mask)
        return self._normed(self.norm2, x + self._ffn(x), mask)


class _Encoder:
    """The classifier's layers (`kind: transformer`), applied to plain or packed rows.

    Calling it twice on different inputs gives two graphs over the same weights: the
    plain model (one example per row) and its packed twin.
    """

    def __init__(self, keras, custom_layers, cfg, vocab_size, num_classes, max_length):
        self.cfg, self.custom_layers = cfg, custom_layers
        # Created in the order the layers are first called (Keras' automatic names).
        self.padding_mask = custom_layers.PaddingMask(name="padding_mask")
        if cfg.embedding_rank:
            # Factorized (ALBERT): vocab x rank + rank x d_model instead of vocab x d_model.
            self.embeddings = [
                keras.layers.Embedding(vocab_size, cfg.embedding_rank, name="token_embedding"),
                keras.layers.Dense(cfg.d_model, use_bias=False, name="embedding_projection")]
        else:
            self.embeddings = [
                keras.layers.Embedding(vocab_size, cfg.d_model, name="token_embedding")]
        self.positions = custom_layers.PositionEmbedding(max_length, name="position_embedding")
        self.embedding_dropout = keras.layers.Dropout(cfg.dropout, name="embedding_dropout")
        self.blocks = [_Block(keras, custom_layers, cfg, "shared_block")] if cfg.share_layers \
            else [_Block(keras, custom_layers, cfg, f"block{i}", i)
                  for i in range(cfg.num_layers)]
        self.final_norm = (_norm(keras, custom_layers, cfg.norm, "final_norm")
                           if cfg.norm_position == "pre" else None)
        self.pooling = custom_layers.MaskedMeanPooling(name="pooling")
        # The logits head stays float32 under mixed precision: the loss needs full range.
        self.logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")

    def __call__(self, token_ids, segment_ids=None, max_segments=None):
        """Logits (batch, classes), or (batch, max_segments, classes) for packed rows."""
        cfg = self.cfg
        mask = self.padding_mask(token_ids)
        x = token_ids
        for layer in self.embeddings:
            x = layer(x)
        if segment_ids is None:
            x = self.positions(x)
        else:
            positions = self.custom_layers.SegmentPositions(
                max_segments, name="segment_positions")(segment_ids)
            x = self.positions([x, positions])
        x = self.embedding_dropout(x)
        for i in range(cfg.num_layers):
            x = self.blocks[i % len(self.blocks)](x, mask, segment_ids)
        if self.final_norm is not None:
            x = (self.final_norm(x, mask=mask) if cfg.norm == "batch"
                 else self.final_norm(x))
        if segment_ids is None:
            pooled = self.pooling([x, mask])
        else:
            pooled = self.custom_layers.SegmentMeanPooling(
                max_segments, name="segment_pooling")([x, segment_ids])
        return self.logits(pooled)


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
    cfg, vocab_size, num_classes, max_length, keras=None, name="transformer_classifier",
    max_segments=None,
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
        max_segments: int or None. Also build the packed twin (see
            `tf_effitrain.data.packing`): rows of several examples, each attending
            within itself, with its own positions and pooling, up to `max_segments`
            per row.

    Returns:
        A functional model mapping int32 token ids (batch, seq) to float32 logits
        (batch, num_classes). With `max_segments`: `(model, packed)`, where `packed`
        shares every weight with `model` and maps `{"token_ids", "segment_ids"}`
        (batch, seq) to logits (batch, max_segments, num_classes); train `packed`,
        save and export `model`.

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
    if max_segments is not None and (cfg.kind != "transformer" or not isinstance(
            max_segments, int) or max_segments < 1):
        raise ValueError(
            "`max_segments` must be an integer >= 1, for `kind: transformer` (keras-hub's "
            f"BertBackbone has no packed inputs). Received: max_segments={max_segments!r}, "
            f"kind={cfg.kind!r}")
    if cfg.kind == "bert_backbone" and (cfg.layer_heads or cfg.layer_ffn_dims or cfg.low_rank):
        raise ValueError("`layer_heads`, `layer_ffn_dims` and `low_rank` apply to "
                         "`kind: transformer` only (keras-hub's BertBackbone has uniform "
                         "layers).")
    custom_layers = layers_for(keras)
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    if cfg.kind == "bert_backbone":
        mask = custom_layers.PaddingMask(name="padding_mask")(token_ids)
        pooled = _build_bert_backbone(keras, cfg, token_ids, mask, vocab_size, max_length)
        # The logits head stays float32 under mixed precision: the loss needs full range.
        logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(pooled)
        return keras.Model(token_ids, logits, name=name)
    encoder = _Encoder(keras, custom_layers, cfg, vocab_size, num_classes, max_length)
    model = keras.Model(token_ids, encoder(token_ids), name=name)
    unknown = sorted({n for n, _ in _low_rank(cfg)} - {layer.name for layer in model.layers})
    if unknown:
        raise ValueError(
            f"`low_rank` names layers the model does not have: {unknown}. Dense layers: "
            f"{[l.name for l in model.layers if type(l).__name__ == 'Dense']}")
    if max_segments is None:
        return model
    packed_inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "segment_ids": keras.Input(shape=(None,), dtype="int32", name="segment_ids"),
    }
    packed = keras.Model(
        packed_inputs, encoder(packed_inputs["token_ids"], packed_inputs["segment_ids"],
                               max_segments), name=f"{name}_packed")
    return model, packed


def count_params(model):
    """Trainable and total parameter counts of a built model, as a dict."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return {"trainable": trainable, "total": int(model.count_params())}
