"""Custom Transformer layers, defined once per Keras engine from the same code.

The layers use `tf` ops only, so the class bodies run unchanged in Keras 3 (TF backend)
and in tf_keras; `layers_for(keras)` creates and registers them for one engine. Each
has `get_config` and is registered as `tf_effitrain>Name` in that engine's registry.
"""

import functools
import math
import types

import tensorflow as tf

from tf_effitrain import _registry
from tf_effitrain.config.choices import ATTENTION_KINDS
from tf_effitrain.engine import ops_for, register_serializable

__all__ = ["layers_for", "attention_bias_reference"]

# Attention logits are shifted and clipped to [-_LOGIT_RANGE, 0]: exp(-20) = 2e-9.
_LOGIT_RANGE = 20.0


def _split_heads(x, num_heads):
    """(batch, seq, d) -> (batch, heads, seq, d // heads)."""
    b, s = tf.shape(x)[0], tf.shape(x)[1]
    x = tf.reshape(x, [b, s, num_heads, x.shape[-1] // num_heads])
    return tf.transpose(x, [0, 2, 1, 3])


def _pad_to_multiple(x, axis, multiple):
    """Pads `x` with zeros along `axis` to a multiple of `multiple`; returns (x, pad)."""
    length = tf.shape(x)[axis]
    pad = (-length) % multiple
    paddings = [[0, 0]] * len(x.shape)
    paddings[axis] = [0, pad]
    return tf.pad(x, paddings), pad


def _softmax_attend(scores, key_mask, v):
    """Softmax over the real keys, then the weighted sum of `v`.

    Quantization-friendly masking: a padded key is not pushed to -1e9 (full-integer
    int8 conversion then gives the scores tensor a range of 1e9 and every real score
    falls in one quantization step: 39% test accuracy on the demo model). Instead the
    scores are shifted by the row's largest *real* score and clipped to
    [-`_LOGIT_RANGE`, 0], padded keys get -`_LOGIT_RANGE`, and their probabilities
    are zeroed after the softmax. Every tensor keeps a range of a few units. In float32
    this is the masked softmax up to a relative exp(-`_LOGIT_RANGE`) per padded or
    clipped key (2e-9). No division: int8 DIV crashes TensorFlow's interpreter and
    the quantization debugger when a divisor's int8 code is 0.
    """
    # Softmax in float32: bf16/fp16 logits lose the small probabilities.
    scores = tf.cast(scores, tf.float32)
    real = tf.cast(key_mask, tf.float32) > 0.5
    # The row minimum stands in for padded keys: the max is over real keys, and no
    # tensor gets a range wider than the scores' own.
    fill = tf.reduce_min(scores, axis=-1, keepdims=True)
    shift = tf.reduce_max(tf.where(real, scores, fill), axis=-1, keepdims=True)
    logits = tf.where(real, tf.maximum(scores - shift, -_LOGIT_RANGE), -_LOGIT_RANGE)
    # A row without real keys (an empty text) gets zeros.
    probs = tf.nn.softmax(logits, axis=-1) * tf.cast(real, tf.float32)
    return tf.matmul(tf.cast(probs, v.dtype), v)


def _additive_attend(scores, key_mask, v):
    """The training path's masked softmax: a float32 bias of -1e9 on masked keys.

    The same function as `_softmax_attend` up to its 2e-9 clipping, at about half the
    elementwise work on the (batch, heads, queries, keys) scores (measured: 1.2x-1.4x
    training steps under mixed_bfloat16, docs/performance.md). Not int8-friendly (the
    bias spans 1e9), which only the exported (inference) graph needs: `SelfAttentionCore`
    uses this with `training=True` only. A query without any real key (a padding
    position) averages the values instead of returning zeros; nothing reads it.
    """
    scores = tf.cast(scores, tf.float32)
    bias = (tf.cast(key_mask, tf.float32) - 1.0) * 1e9
    probs = tf.nn.softmax(scores + bias, axis=-1)
    return tf.matmul(tf.cast(probs, v.dtype), v)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@tf.custom_gradient
def _gelu_exact(x):
    """Exact GELU, `x * Phi(x)`, the forward pass of Keras' `gelu` (`tf.nn.gelu`), with
    a closed-form gradient `Phi(x) + x * phi(x)` computed in float32.

    Autodiff through `erfc` builds a longer chain of elementwise ops in the compute
    dtype; this gradient costs a few ops and keeps bfloat16 inputs' derivatives in
    float32 (measured: ~1.07x training steps at d_model 256, docs/performance.md).
    """
    y = tf.nn.gelu(x, approximate=False)

    def grad(dy):
        x32 = tf.cast(x, tf.float32)
        cdf = 0.5 * tf.math.erfc(-x32 * _SQRT_HALF)
        pdf = tf.exp(-0.5 * tf.square(x32)) * _INV_SQRT_2PI
        return tf.cast(tf.cast(dy, tf.float32) * (cdf + x32 * pdf), x.dtype)

    return y, grad


def _same_segment(query_segments, key_segments):
    """1.0 where a query and a key belong to the same packed example, as float32.

    `query_segments` (..., q) and `key_segments` (..., k) give (..., q, k). Padding
    (segment 0) keys are excluded by the key mask, not here.
    """
    return tf.cast(tf.equal(query_segments[..., :, None], key_segments[..., None, :]),
                   tf.float32)


def full_attention(q, k, v, mask, segments=None, attend=_softmax_attend):
    """q, k, v: (b, h, s, dh); mask: (b, s) with 1 for tokens. Returns (b, h, s, dh).

    `segments` (b, s), for packed rows: the segment id of each token (0 for padding);
    a token then attends only to the tokens of its own segment. `attend`: the masked
    softmax (`_softmax_attend`, int8-friendly, or `_additive_attend`, for training).
    """
    scores = tf.matmul(q, k, transpose_b=True)
    key_mask = mask[:, None, None, :]
    if segments is not None:
        key_mask = key_mask * _same_segment(segments, segments)[:, None]
    return attend(scores, key_mask, v)


def block_sparse_attention(q, k, v, mask, block_size, segments=None,
                           attend=_softmax_attend):
    """Each token attends to the tokens of its own block: O(s * block) memory and FLOPs.

    Packed rows (`segments`, see `full_attention`) must start every segment on a block
    boundary (the packer aligns them) for a segment's blocks to be those it has alone.
    """
    seq_len = tf.shape(q)[2]
    (q, k, v), _ = zip(*(_pad_to_multiple(t, 2, block_size) for t in (q, k, v)))
    mask, _ = _pad_to_multiple(mask, 1, block_size)
    b, h, s_pad, dh = tf.shape(q)[0], tf.shape(q)[1], tf.shape(q)[2], q.shape[-1]
    n = s_pad // block_size
    blocks = lambda t: tf.reshape(t, [b, h, n, block_size, dh])  # noqa: E731
    scores = tf.matmul(blocks(q), blocks(k), transpose_b=True)  # (b, h, n, B, B)
    key_mask = tf.reshape(mask, [b, 1, n, 1, block_size])
    if segments is not None:
        segments, _ = _pad_to_multiple(segments, 1, block_size)
        block_segments = tf.reshape(segments, [b, n, block_size])
        key_mask = key_mask * _same_segment(block_segments, block_segments)[:, None]
    out = attend(scores, key_mask, blocks(v))
    return tf.reshape(out, [b, h, s_pad, dh])[:, :, :seq_len]


def local_attention(q, k, v, mask, window, segments=None, attend=_softmax_attend):
    """Token i attends to tokens j with |i - j| <= window: O(s * window) memory and FLOPs.

    Queries are cut into chunks of `window`; each chunk scores only its own chunk and the
    two neighbours (3 * window keys), and a band mask keeps |i - j| <= window. Packed
    rows (`segments`, see `full_attention`) also keep j in i's segment.
    """
    c = window
    seq_len = tf.shape(q)[2]
    (q, k, v), _ = zip(*(_pad_to_multiple(t, 2, c) for t in (q, k, v)))
    mask, _ = _pad_to_multiple(mask, 1, c)
    b, h, s_pad, dh = tf.shape(q)[0], tf.shape(q)[1], tf.shape(q)[2], q.shape[-1]
    n = s_pad // c

    def neighbours(t, axis):
        # One empty chunk at each end, then chunks (i-1, i, i+1) side by side.
        paddings = [[0, 0]] * len(t.shape)
        paddings[axis] = [c, c]
        t = tf.pad(t, paddings)
        shape = tf.concat([tf.shape(t)[:axis], [n + 2, c], tf.shape(t)[axis + 1:]], 0)
        t = tf.reshape(t, shape)
        parts = [tf.gather(t, tf.range(i, i + n), axis=axis) for i in range(3)]
        return tf.concat(parts, axis=axis + 1)

    qc = tf.reshape(q, [b, h, n, c, dh])
    kc, vc = neighbours(k, 2), neighbours(v, 2)  # (b, h, n, 3c, dh)
    key_valid = neighbours(mask, 1)  # (b, n, 3c)
    offset = tf.range(3 * c)[None, :] - c - tf.range(c)[:, None]  # key pos - query pos
    band = tf.cast(tf.abs(offset) <= window, mask.dtype)  # (c, 3c)
    key_mask = key_valid[:, None, :, None, :] * band[None, None, None]
    if segments is not None:
        segments, _ = _pad_to_multiple(segments, 1, c)
        same = _same_segment(tf.reshape(segments, [b, n, c]), neighbours(segments, 1))
        key_mask = key_mask * same[:, None]  # (b, 1, n, c, 3c)
    out = attend(tf.matmul(qc, kc, transpose_b=True), key_mask, vc)
    return tf.reshape(out, [b, h, s_pad, dh])[:, :, :seq_len]


def attention_bias_reference(mask, kind, window=None, block_size=None):
    """Dense (b, s, s) 0/1 matrix of which keys each query may see; the test oracle
    (for one example per row)."""
    s = tf.shape(mask)[1]
    i = tf.range(s)[:, None]
    j = tf.range(s)[None, :]
    if kind == "full":
        allowed = tf.ones([s, s], tf.bool)
    elif kind == "local":
        allowed = tf.abs(i - j) <= window
    else:
        allowed = tf.equal(i // block_size, j // block_size)
    return tf.cast(allowed, mask.dtype)[None] * mask[:, None, :]


@functools.lru_cache(maxsize=None)
def layers_for(keras):
    """The custom layer classes for one engine, as a namespace."""
    register = register_serializable(keras)
    ops = ops_for(keras)

    def gelu(x):
        """Exact GELU (as Keras' `"gelu"` activation) with a cheaper gradient. Named
        `gelu`: tfmot's quantization wrappers recognise activations by name."""
        return _gelu_exact(x)

    gelu = register(gelu)

    @register
    class PaddingMask(keras.layers.Layer):
        """1.0 where `token_ids != pad_id`, else 0.0, as a float32 (batch, seq) tensor.

        Args:
            pad_id: int. The padding token id.
        """

        def __init__(self, pad_id=0, **kwargs):
            kwargs.setdefault("dtype", "float32")
            super().__init__(**kwargs)
            self.pad_id = pad_id

        def call(self, token_ids):
            return tf.cast(tf.not_equal(token_ids, self.pad_id), tf.float32)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "pad_id": self.pad_id}

    @register
    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned position embedding to (batch, seq, d) inputs.

        Args:
            max_length: int. Longest sequence the table covers.
            initializer_range: float. Stddev of the truncated-normal initialiser.
        """

        def __init__(self, max_length, initializer_range=0.02, **kwargs):
            super().__init__(**kwargs)
            self.max_length = max_length
            self.initializer_range = initializer_range

        def build(self, input_shape):
            if isinstance(input_shape, (list, tuple)) and isinstance(
                    input_shape[0], (list, tuple)):
                input_shape = input_shape[0]  # `[x, positions]`
            self.position_embeddings = self.add_weight(
                name="embeddings",
                shape=(self.max_length, input_shape[-1]),
                initializer=keras.initializers.TruncatedNormal(stddev=self.initializer_range),
            )
            super().build(input_shape)

        def call(self, inputs):
            # `x`, or `[x, positions]` for packed rows (positions restart per segment).
            x, positions = inputs if isinstance(inputs, (list, tuple)) else (inputs, None)
            table = tf.cast(self.position_embeddings, x.dtype)
            if positions is None:
                return x + table[None, : tf.shape(x)[1]]
            return x + tf.gather(table, positions)

        def compute_output_shape(self, input_shape):
            if isinstance(input_shape, (list, tuple)) and isinstance(
                    input_shape[0], (list, tuple)):
                return input_shape[0]
            return input_shape

        def get_config(self):
            return {
                **super().get_config(),
                "max_length": self.max_length,
                "initializer_range": self.initializer_range,
            }

    @register
    class RMSNormalization(keras.layers.Layer):
        """Root-mean-square normalisation over the last axis, with a learned scale.

        Args:
            epsilon: float. Added to the mean square.
        """

        def __init__(self, epsilon=1e-6, **kwargs):
            super().__init__(**kwargs)
            self.epsilon = epsilon

        def build(self, input_shape):
            self.scale = self.add_weight(
                name="scale", shape=(input_shape[-1],), initializer="ones"
            )
            super().build(input_shape)

        def call(self, x):
            x32 = tf.cast(x, tf.float32)
            ms = tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True)
            y = x32 * tf.math.rsqrt(ms + self.epsilon) * tf.cast(self.scale, tf.float32)
            return tf.cast(y, self.compute_dtype)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "epsilon": self.epsilon}

    @register
    class SelfAttentionCore(keras.layers.Layer):
        """Multi-head scaled dot-product attention over projected q, k, v (no weights).

        Projections are separate Dense layers in the model (so tfmot can prune and
        quantize them, and keys and values can share one); this layer splits heads,
        applies the padding mask and the attention pattern, and merges heads.

        Args:
            num_heads: int. Attention heads; must divide the last dimension.
            attention: str. `"full"`, `"local"` or `"block_sparse"`.
            window: int. Half-width of the local window (`"local"`).
            block_size: int. Block length (`"block_sparse"`).

        Call args:
            inputs: list `[q, k, v, mask]`; q, k, v of shape (batch, seq, d), mask of
                shape (batch, seq) with 1.0 for real tokens. Packed rows add the int32
                segment ids (batch, seq) as a fifth item: tokens attend within their
                segment only.
        """

        def __init__(self, num_heads, attention="full", window=16, block_size=16, **kwargs):
            super().__init__(**kwargs)
            if attention not in ATTENTION_KINDS:
                raise ValueError(
                    f"`attention` must be one of {ATTENTION_KINDS}. "
                    f"Received: attention={attention!r}"
                )
            # Accept (and consume) a Keras mask arriving with q/k/v: padding is handled
            # by the explicit `mask` input.
            self.supports_masking = True
            self.num_heads = num_heads
            self.attention = attention
            self.window = window
            self.block_size = block_size

        def call(self, inputs, training=None):
            q, k, v, mask = inputs[:4]
            # Training takes the cheaper additive mask; inference (and so every export)
            # the int8-friendly one. They agree to 1e-6 (tests/test_packing.py).
            attend = _additive_attend if training is True else _softmax_attend
            segments = tf.cast(inputs[4], tf.float32) if len(inputs) > 4 else None
            d = q.shape[-1]
            q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
            q = q * tf.cast(1.0 / math.sqrt(d // self.num_heads), q.dtype)
            mask = tf.cast(mask, tf.float32)
            if self.attention == "full":
                out = full_attention(q, k, v, mask, segments, attend)
            elif self.attention == "local":
                out = local_attention(q, k, v, mask, self.window, segments, attend)
            else:
                out = block_sparse_attention(q, k, v, mask, self.block_size, segments,
                                             attend)
            out = tf.transpose(out, [0, 2, 1, 3])
            return tf.reshape(out, [tf.shape(out)[0], tf.shape(out)[1], d])

        def compute_mask(self, inputs, mask=None):
            return None

        def compute_output_shape(self, input_shape):
            return input_shape[0]

        def get_config(self):
            return {
                **super().get_config(),
                "num_heads": self.num_heads,
                "attention": self.attention,
                "window": self.window,
                "block_size": self.block_size,
            }

    @register
    class MaskedMeanPooling(keras.layers.Layer):
        """Mean over the sequence axis of the real (unmasked) tokens.

        Call args:
            inputs: list `[x, mask]`, x of shape (batch, seq, d), mask (batch, seq).
        """

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True  # consumes the mask: its output is per example

        def compute_mask(self, inputs, mask=None):
            return None

        def call(self, inputs):
            x, mask = inputs
            m = tf.cast(mask, tf.float32)
            # Weights 1/count on real tokens as a softmax over 0 (real) / -20
            # (padding), zeroed on padding: no division, which int8 TFLite kernels
            # get wrong (see `_softmax_attend`). Relative error 2e-9 per padded token.
            weights = tf.nn.softmax((m - 1.0) * _LOGIT_RANGE, axis=1) * m
            return tf.reduce_sum(x * tf.cast(weights, x.dtype)[..., None], axis=1)

        def compute_output_shape(self, input_shape):
            x_shape = input_shape[0]
            return (x_shape[0], x_shape[-1])

    @register
    class SegmentPositions(keras.layers.Layer):
        """Position ids that restart at 0 in every segment of a packed row.

        Call args:
            segment_ids: int32 (batch, seq); 1..max_segments for the packed examples'
                tokens, 0 for padding (whose position is 0).

        Args:
            max_segments: int. Most segments a row holds.
        """

        def __init__(self, max_segments, **kwargs):
            super().__init__(**kwargs)
            self.max_segments = max_segments

        def call(self, segment_ids):
            one_hot = tf.one_hot(segment_ids, self.max_segments + 1, dtype=tf.int32)
            # A token's position is how many tokens of its segment come before it.
            seen = tf.reduce_sum(tf.cumsum(one_hot, axis=1) * one_hot, axis=-1)
            return tf.maximum(seen - 1, 0) * tf.cast(segment_ids > 0, tf.int32)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "max_segments": self.max_segments}

    @register
    class SegmentMeanPooling(keras.layers.Layer):
        """Mean of each segment's tokens: (batch, seq, d) -> (batch, max_segments, d).

        The packed twin of `MaskedMeanPooling`: row `r`, slot `j` is the mean over the
        tokens of segment `j + 1` (zeros for an empty slot).

        Args:
            max_segments: int. Most segments a row holds.

        Call args:
            inputs: list `[x, segment_ids]`.
        """

        def __init__(self, max_segments, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True
            self.max_segments = max_segments

        def compute_mask(self, inputs, mask=None):
            return None

        def call(self, inputs):
            x, segment_ids = inputs
            # float32 sums: bfloat16 loses the mean of long segments.
            one_hot = tf.one_hot(segment_ids, self.max_segments + 1, dtype=tf.float32)[..., 1:]
            sums = tf.einsum("bls,bld->bsd", one_hot, tf.cast(x, tf.float32))
            counts = tf.reduce_sum(one_hot, axis=1)[..., None]
            return tf.cast(sums / tf.maximum(counts, 1.0), x.dtype)

        def compute_output_shape(self, input_shape):
            x_shape = input_shape[0]
            return (x_shape[0], self.max_segments, x_shape[-1])

        def get_config(self):
            return {**super().get_config(), "max_segments": self.max_segments}

    @register
    class LowRankDense(keras.layers.Layer):
        """A Dense layer whose kernel is the product of two factors, `in x rank` and
        `rank x units`: `(in + units) x rank` weights instead of `in x units`.

        Args:
            units: int. Output width.
            rank: int. Inner width of the factorization.
            activation: str or None. Applied after the bias.
            use_bias: bool.
        """

        def __init__(self, units, rank, activation=None, use_bias=True, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.rank = rank
            self.activation = keras.activations.get(activation)
            self.use_bias = use_bias

        def build(self, input_shape):
            self.kernel_a = self.add_weight(name="kernel_a", shape=(input_shape[-1], self.rank),
                                            initializer="glorot_uniform")
            self.kernel_b = self.add_weight(name="kernel_b", shape=(self.rank, self.units),
                                            initializer="glorot_uniform")
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer="zeros") if self.use_bias else None
            self.built = True

        def call(self, x):
            y = tf.matmul(tf.matmul(x, self.kernel_a), self.kernel_b)
            if self.bias is not None:
                y = y + self.bias
            return self.activation(y)

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], self.units)

        def get_prunable_weights(self):
            """Both factors: tfmot's pruning wrapper prunes what this returns."""
            return [self.kernel_a, self.kernel_b]

        def get_config(self):
            return {**super().get_config(), "units": self.units, "rank": self.rank,
                    "activation": keras.activations.serialize(self.activation),
                    "use_bias": self.use_bias}

    def batch_norm(**kwargs):
        return keras.layers.BatchNormalization(**kwargs, **ops.batch_norm_kwargs())

    return types.SimpleNamespace(
        PaddingMask=PaddingMask,
        PositionEmbedding=PositionEmbedding,
        gelu=gelu,
        RMSNormalization=RMSNormalization,
        SelfAttentionCore=SelfAttentionCore,
        MaskedMeanPooling=MaskedMeanPooling,
        SegmentPositions=SegmentPositions,
        SegmentMeanPooling=SegmentMeanPooling,
        LowRankDense=LowRankDense,
        batch_norm=batch_norm,
    )


# Defines serializable classes: register them if an engine was imported meanwhile.
_registry.retry(__name__)
