"""Structured compression of the builder's Transformer: fewer heads, narrower FFNs,
low-rank projections. The result is a plain, smaller model of the same builder family
(its `ModelConfig` says `layer_heads`, `layer_ffn_dims`, `low_rank`), not masks.

Scores:
- `"magnitude"`: a head's (neuron's) summed squared weights over every projection it
  owns: query/key/value columns and attention-output rows (FFN inner column and output
  row).
- `"taylor"`: the first-order estimate of the loss change when the unit's output is
  switched off (Michel et al., 2019; Molchanov et al., 2019): `|sum(g * w)|` over the
  rows of the layer that reads the unit's output (attention output, FFN output), which
  is the gradient of a unit mask, accumulated over batches.

Pure NumPy on weights plus the engine's builder: works in both engines and on
factorized (`LowRankDense`) layers.
"""

import dataclasses
import fnmatch
import math

import numpy as np

from tf_effitrain.config.schema import ModelConfig
from tf_effitrain.engine import keras_of

__all__ = ["SCORE_METHODS", "model_geometry", "unit_scores", "select_units",
           "prune_units", "prune_heads", "factorize", "analytic_flops"]

SCORE_METHODS = ("magnitude", "taylor")


def _blocks(cfg):
    return ["shared_block"] if cfg.share_layers else [f"block{i}" for i in range(cfg.num_layers)]


def _check_cfg(cfg):
    if isinstance(cfg, dict):
        cfg = ModelConfig(**cfg)
    if cfg.kind != "transformer":
        raise ValueError("Structured compression applies to `kind: transformer` models "
                         f"(the toolkit's builder). Received: kind={cfg.kind!r}")
    return cfg


def model_geometry(model):
    """`(vocab_size, num_classes, max_length)` of a builder model."""
    return (int(model.get_layer("token_embedding").input_dim),
            int(model.get_layer("logits").units),
            int(model.get_layer("position_embedding").max_length))


def _input_side(layer):
    """The weight whose rows read the layer's inputs (`kernel` or `kernel_a`)."""
    return layer.kernel_a if hasattr(layer, "kernel_a") else layer.kernel


def _full_kernel(layer):
    if hasattr(layer, "kernel_a"):
        return np.asarray(layer.kernel_a) @ np.asarray(layer.kernel_b)
    return np.asarray(layer.kernel)


def _heads_of(cfg, index):
    return cfg.layer_heads[index] if cfg.layer_heads else cfg.num_heads


def _projections(model, cfg, block):
    names = ["query", "key_value"] if cfg.shared_kv else ["query", "key", "value"]
    return [model.get_layer(f"{block}_{n}") for n in names]


def unit_scores(model, cfg, method="magnitude", data=None, batches=20):
    """Importance of every attention head and FFN neuron.

    Args:
        model: a builder model (either engine).
        cfg: its `ModelConfig`.
        method: `"magnitude"` or `"taylor"` (needs `data`).
        data: iterable of `(token_ids, labels)` batches, for `"taylor"`.
        batches: int. Batches the Taylor scores are accumulated over.

    Returns:
        `{"heads": {block: array}, "neurons": {block: array}}`, higher = more important.
    """
    cfg = _check_cfg(cfg)
    if method not in SCORE_METHODS:
        raise ValueError(f"`method` must be one of {SCORE_METHODS}. Received: method={method!r}")
    head_dim = cfg.d_model // cfg.num_heads
    heads, neurons = {}, {}
    if method == "magnitude":
        for i, block in enumerate(_blocks(cfg)):
            n = _heads_of(cfg, i)
            cols = sum((_full_kernel(p) ** 2).sum(0) for p in _projections(model, cfg, block))
            rows = (_full_kernel(model.get_layer(f"{block}_attention_output")) ** 2).sum(1)
            heads[block] = (cols + rows).reshape(n, head_dim).sum(1)
            inner = (_full_kernel(model.get_layer(f"{block}_ffn_inner")) ** 2).sum(0)
            outer = (_full_kernel(model.get_layer(f"{block}_ffn_output")) ** 2).sum(1)
            neurons[block] = inner + outer
        return {"heads": heads, "neurons": neurons}
    if data is None:
        raise ValueError("`data` must be batches of (token_ids, labels) for "
                         "method='taylor'. Received: data=None")
    import tensorflow as tf

    keras = keras_of(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    readers = {block: (_input_side(model.get_layer(f"{block}_attention_output")),
                       _input_side(model.get_layer(f"{block}_ffn_output")))
               for block in _blocks(cfg)}
    variables = [v for pair in readers.values() for v in pair]

    @tf.function(reduce_retracing=True)
    def mask_gradients(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        grads = tape.gradient(loss, variables)
        # d loss / d (unit mask) = sum over the unit's reading row of g * w.
        return [tf.reduce_sum(tf.cast(g, tf.float32) * tf.cast(v, tf.float32), axis=1)
                for g, v in zip(grads, variables)]

    totals = [np.zeros(int(v.shape[0])) for v in variables]
    seen = 0
    for x, y in data:
        for total, g in zip(totals, mask_gradients(x, y)):
            total += np.abs(np.asarray(g))
        seen += 1
        if seen >= batches:
            break
    if not seen:
        raise ValueError("`data` must yield at least one batch to score with. Received: "
                         "an empty `data`")
    for i, block in enumerate(_blocks(cfg)):
        rows_head, rows_neuron = totals[2 * i], totals[2 * i + 1]
        heads[block] = rows_head.reshape(_heads_of(cfg, i), head_dim).sum(1) / seen
        neurons[block] = rows_neuron / seen
    return {"heads": heads, "neurons": neurons}


def _removed(fraction, n):
    """`fraction * n` rounded half down, robust to float noise: 0.25 of 2 removes 0,
    not 1 because 0.25 came out as 0.25000000000000006 of a fraction computation."""
    return int(math.floor(fraction * n + 0.5 - 1e-9))


def select_units(scores, fraction=None, scope="layer", keep=None):
    """The units to keep: the highest-scoring `1 - fraction` of them.

    Args:
        scores: dict. `{block: array of scores}` (one kind of unit).
        fraction: float in [0, 1). Share of the units to remove (or pass `keep`).
        scope: str. `"layer"` (the same share in every layer) or `"global"` (one
            ranking over all layers, each layer's scores divided by their L2 norm so
            layers of different scales compare; Michel et al., 2019).
        keep: dict or int or None. Instead of `fraction`: units to keep per block
            (`{block: count}`, layer scope) or in total (int, global scope).

    Returns:
        `{block: sorted int array of kept indices}`; every layer keeps at least one.
        Ties keep the lower index (within a layer, and across layers the earlier layer).
    """
    if keep is None and (fraction is None or not 0.0 <= fraction < 1.0):
        raise ValueError(f"`fraction` must be in [0, 1). Received: fraction={fraction}")
    if scope not in ("layer", "global"):
        raise ValueError(f"`scope` must be 'layer' or 'global'. Received: scope={scope!r}")
    if scope == "layer":
        kept = {}
        for block, s in scores.items():
            count = keep[block] if isinstance(keep, dict) else len(s) - _removed(fraction, len(s))
            # A stable sort: ties keep the lower index, so scores decide reproducibly.
            kept[block] = np.sort(np.argsort(-np.asarray(s), kind="stable")[:max(1, count)])
        return kept
    order = {block: i for i, block in enumerate(scores)}
    flat = [(float(v) / (np.linalg.norm(s) or 1.0), block, j)
            for block, s in scores.items() for j, v in enumerate(s)]
    total = len(flat)
    remove = total - keep if isinstance(keep, int) else _removed(fraction, total)
    # Lowest score first; on ties the later layer and the higher index go first.
    flat.sort(key=lambda t: (t[0], -order[t[1]], -t[2]))
    removed = {block: set() for block in scores}
    for _, block, j in flat:
        if remove == 0:
            break
        if len(removed[block]) + 1 < len(scores[block]):  # keep one per layer
            removed[block].add(j)
            remove -= 1
    return {block: np.array([j for j in range(len(s)) if j not in removed[block]])
            for block, s in scores.items()}


def _slice(layer, weights, cols=None, rows=None):
    """A projection's weights keeping output columns `cols` / input rows `rows`."""
    if hasattr(layer, "kernel_a"):
        a, b, *bias = weights
        if rows is not None:
            a = a[rows]
        if cols is not None:
            b, bias = b[:, cols], [w[cols] for w in bias]
        return [a, b, *bias]
    kernel, *bias = weights
    if rows is not None:
        kernel = kernel[rows]
    if cols is not None:
        kernel, bias = kernel[:, cols], [w[cols] for w in bias]
    return [kernel, *bias]


def _rebuild(model, cfg, new_cfg, transform):
    """Builds `new_cfg` in `model`'s engine and copies the weights, layer by layer,
    through `transform(layer, weights) -> weights` (same names in both models)."""
    from tf_effitrain.models import build_transformer_classifier

    vocab, classes, length = model_geometry(model)
    new = build_transformer_classifier(new_cfg, vocab, classes, length,
                                       keras=keras_of(model), name=model.name)
    for layer in new.layers:
        if layer.weights:
            old = model.get_layer(layer.name)
            layer.set_weights(transform(old, [np.asarray(w) for w in old.get_weights()]))
    return new


def prune_units(model, cfg, keep_heads=None, keep_neurons=None):
    """A smaller builder model keeping only the given heads and FFN neurons.

    Args:
        model: a builder model (either engine).
        cfg: its `ModelConfig`.
        keep_heads: `{block: kept head indices}` or None (all heads).
        keep_neurons: `{block: kept neuron indices}` or None (all neurons).

    Returns:
        `(compact model, its ModelConfig)`: same engine, same layer names, per-layer
        `layer_heads` / `layer_ffn_dims`; outputs equal the original's when the removed
        units' weights are zero.
    """
    cfg = _check_cfg(cfg)
    blocks = _blocks(cfg)
    head_dim = cfg.d_model // cfg.num_heads
    keep_heads = keep_heads or {b: np.arange(_heads_of(cfg, i)) for i, b in enumerate(blocks)}
    ffn = [cfg.layer_ffn_dims[i] if cfg.layer_ffn_dims else cfg.ffn_dim
           for i in range(len(blocks))]
    keep_neurons = keep_neurons or {b: np.arange(ffn[i]) for i, b in enumerate(blocks)}
    for kind, kept in (("keep_heads", keep_heads), ("keep_neurons", keep_neurons)):
        for b in blocks:
            idx = np.asarray(kept[b], int)
            if len(idx) == 0 or len(set(idx.tolist())) != len(idx):
                raise ValueError(f"`{kind}` must give each layer distinct indices, at least "
                                 f"one. Received: {kind}[{b!r}]={idx.tolist()}")
    heads_kept = {b: len(keep_heads[b]) for b in blocks}
    ffn_kept = {b: len(keep_neurons[b]) for b in blocks}

    def clipped(entry):
        # A factorized layer whose widths shrink keeps a rank <= min(in, out).
        name, _, rank = entry.partition(":")
        block, _, role = name.partition("_")
        if block == "shared":
            block, role = "shared_block", role.partition("_")[2]
        width = heads_kept.get(block, 0) * head_dim
        dims = {"query": (cfg.d_model, width), "key": (cfg.d_model, width),
                "value": (cfg.d_model, width), "key_value": (cfg.d_model, width),
                "attention_output": (width, cfg.d_model),
                "ffn_inner": (cfg.d_model, ffn_kept.get(block, 0)),
                "ffn_output": (ffn_kept.get(block, 0), cfg.d_model)}.get(role)
        return f"{name}:{min(int(rank), *dims)}" if dims and block in heads_kept else entry

    new_cfg = dataclasses.replace(
        cfg, layer_heads=[int(heads_kept[b]) for b in blocks],
        layer_ffn_dims=[int(ffn_kept[b]) for b in blocks],
        low_rank=[clipped(e) for e in cfg.low_rank])
    new_ranks = {e.partition(":")[0]: int(e.partition(":")[2]) for e in new_cfg.low_rank}
    columns = {b: np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim)
                                  for h in np.asarray(keep_heads[b], int)]) for b in blocks}

    def reranked(layer, weights):
        rank = new_ranks.get(layer.name)
        if rank is None or weights[0].shape[1] == rank:
            return weights
        u, s, vt = np.linalg.svd(weights[0].astype(np.float64) @ weights[1], full_matrices=False)
        root = np.sqrt(s[:rank])
        return [(u[:, :rank] * root).astype(np.float32),
                (root[:, None] * vt[:rank]).astype(np.float32), *weights[2:]]

    def transform(layer, weights):
        block, _, role = layer.name.partition("_")
        if block == "shared":  # "shared_block_query" -> ("shared_block", "query")
            block, role = "shared_block", role.partition("_")[2]
        if block not in columns:
            return weights
        if role in ("query", "key", "value", "key_value"):
            weights = _slice(layer, weights, cols=columns[block])
        elif role == "attention_output":
            weights = _slice(layer, weights, rows=columns[block])
        elif role == "ffn_inner":
            weights = _slice(layer, weights, cols=np.asarray(keep_neurons[block], int))
        elif role == "ffn_output":
            weights = _slice(layer, weights, rows=np.asarray(keep_neurons[block], int))
        return reranked(layer, weights) if hasattr(layer, "kernel_a") else weights

    return _rebuild(model, cfg, new_cfg, transform), new_cfg


def prune_heads(model, cfg, heads_fraction=0.5, neurons_fraction=0.5, method="taylor",
                data=None, batches=20, scope="layer"):
    """Scores heads and FFN neurons and removes the lowest: a smaller model.

    Args:
        model: a builder model (either engine).
        cfg: its `ModelConfig`.
        heads_fraction: float in [0, 1). Share of attention heads to remove.
        neurons_fraction: float in [0, 1). Share of FFN neurons to remove.
        method: `"taylor"` (needs `data`) or `"magnitude"`.
        data: iterable of `(token_ids, labels)` batches (the training split).
        batches: int. Batches the Taylor scores use.
        scope: `"layer"` or `"global"` (see `select_units`).

    Returns:
        `(compact model, its ModelConfig)`. Fine-tune it with `model.fit` (or
        `tf-effitrain compress`).

    Example:

    ```python
    small, small_cfg = et.prune_heads(model, config.model, heads_fraction=0.5,
                                      neurons_fraction=0.5, data=data.train.take(20))
    small.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    small.fit(data.train, validation_data=data.validation, epochs=3)
    ```
    """
    scores = unit_scores(model, cfg, method, data, batches)
    keep_heads = select_units(scores["heads"], heads_fraction, scope)
    keep_neurons = select_units(scores["neurons"], neurons_fraction, scope)
    return prune_units(model, cfg, keep_heads, keep_neurons)


def _rank_for(singular, rank=None, rank_fraction=None, energy=None):
    full = len(singular)
    if rank is not None:
        return max(1, min(int(rank), full))
    if rank_fraction is not None:
        return max(1, int(round(rank_fraction * full)))
    power = np.cumsum(singular ** 2) / max(float(np.sum(singular ** 2)), 1e-30)
    return int(min(full, np.searchsorted(power, energy - 1e-12) + 1))


def factorize(model, cfg, layers=("*_ffn_*",), rank=None, rank_fraction=None, energy=None,
              full_rank_ok=False):
    """Replaces chosen Dense kernels by truncated-SVD factors (`LowRankDense`).

    `W = U S V^T` is kept as `(U_r sqrt(S_r)) (sqrt(S_r) V_r^T)`; full rank reproduces
    the layer. Exactly one of `rank`, `rank_fraction`, `energy` chooses each layer's rank.

    Args:
        model: a builder model (either engine).
        cfg: its `ModelConfig`.
        layers: sequence of str. `fnmatch` patterns on encoder layer names, e.g.
            `"*_ffn_*"` (both FFN layers), `"*_query"`, `"block0_*"`.
        rank: int. The same rank for every chosen layer.
        rank_fraction: float in (0, 1]. Rank as a share of each kernel's full rank.
        energy: float in (0, 1]. Smallest rank keeping this share of the squared
            singular values.
        full_rank_ok: bool. Factorize even where the factors have no fewer weights
            than the kernel (for checks; such layers are otherwise kept dense, with a
            warning).

    Returns:
        `(factorized model, its ModelConfig with low_rank entries)`.

    Example:

    ```python
    small, small_cfg = et.factorize(model, config.model, layers=["*_ffn_*"],
                                    rank_fraction=0.5)
    ```
    """
    cfg = _check_cfg(cfg)
    if sum(v is not None for v in (rank, rank_fraction, energy)) != 1:
        raise ValueError("Pass exactly one of `rank`, `rank_fraction`, `energy`. "
                         f"Received: rank={rank}, rank_fraction={rank_fraction}, "
                         f"energy={energy}")
    for name, value, low in (("rank_fraction", rank_fraction, 0.0), ("energy", energy, 0.0)):
        if value is not None and not low < value <= 1.0:
            raise ValueError(f"`{name}` must be in (0, 1]. Received: {name}={value}")
    existing = {e.partition(":")[0] for e in cfg.low_rank}
    blocks = tuple(_blocks(cfg))
    chosen, factors = [], {}
    for layer in model.layers:
        if (type(layer).__name__ == "Dense" and layer.name.startswith(blocks)
                and layer.name not in existing
                and any(fnmatch.fnmatchcase(layer.name, p) for p in layers)):
            chosen.append(layer.name)
    if not chosen:
        names = [l.name for l in model.layers if type(l).__name__ == "Dense"]
        raise ValueError(f"`layers` must match an encoder Dense layer ({names}). "
                         f"Received: layers={list(layers)}")
    skipped = []
    for name in chosen:
        kernel = np.asarray(model.get_layer(name).kernel, np.float64)
        u, s, vt = np.linalg.svd(kernel, full_matrices=False)
        r = _rank_for(s, rank, rank_fraction, energy)
        if r * sum(kernel.shape) >= kernel.size and not full_rank_ok:
            # Two factors with no fewer weights: slower, not smaller. Kept dense.
            skipped.append(f"{name} (rank {r} of {kernel.shape[0]}x{kernel.shape[1]})")
            continue
        root = np.sqrt(s[:r])
        factors[name] = ((u[:, :r] * root).astype(np.float32),
                         (root[:, None] * vt[:r]).astype(np.float32))
    if skipped:
        import warnings

        warnings.warn(f"Not factorized (the factors would not have fewer weights than the "
                      f"kernel): {', '.join(skipped)}. Lower the rank.", stacklevel=2)
    if not factors:
        raise ValueError(
            "No chosen kernel gets fewer weights at this rank (a kernel `in x out` saves "
            f"weights only below rank in*out/(in+out)). Skipped: {', '.join(skipped)}")
    chosen = [name for name in chosen if name in factors]
    new_cfg = dataclasses.replace(cfg, low_rank=[*cfg.low_rank, *(
        f"{name}:{factors[name][0].shape[1]}" for name in chosen)])

    def transform(layer, weights):
        if layer.name not in factors:
            return weights
        return [*factors[layer.name], *weights[1:]]

    return _rebuild(model, cfg, new_cfg, transform), new_cfg


def analytic_flops(model, cfg, length):
    """Forward-pass FLOPs of one example of `length` tokens (2 per multiply-add):
    every Dense / LowRankDense kernel applied per token, attention scores and weighted
    values over the positions each token attends to, and the logits."""
    cfg = _check_cfg(cfg)
    # Local attention scores 3 * window keys per query (its chunk and both neighbours).
    attended = {"full": length, "local": min(length, 3 * cfg.window),
                "block_sparse": min(length, cfg.block_size)}[cfg.attention]
    flops = 0
    calls = cfg.num_layers if cfg.share_layers else 1
    for layer in model.layers:
        kernels = [w for w in layer.weights if "kernel" in w.name.split("/")[-1]]
        if not kernels or layer.name == "token_embedding":
            continue
        per_token = sum(int(np.prod(w.shape)) for w in kernels)
        tokens = 1 if layer.name == "logits" else length
        flops += 2 * per_token * tokens * (calls if layer.name.startswith("shared_block") else 1)
    for i, block in enumerate(_blocks(cfg)):
        width = _heads_of(cfg, i) * (cfg.d_model // cfg.num_heads)
        flops += 4 * length * attended * width * calls  # QK^T and AV
    return int(flops)
