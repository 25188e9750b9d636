"""Magnitude pruning with tfmot wrappers: unstructured or m:n (2:4), on a tf_keras model.

`prune` wraps the chosen layers of a tf_keras model in tfmot's `PruneLowMagnitude`;
`strip` applies the final masks and removes the wrappers (also through the toolkit's
gradient accumulator, where tfmot's `strip_pruning` raises); `sparsity_table` reports
the zeros each kernel holds. The builder's attention is four rank-2 `Dense` projections
(query, key, value, output) around a weightless `SelfAttentionCore`, so attention
kernels are pruned like FFN kernels, 2:4 included (tfmot refuses the rank-3 kernels
of `MultiHeadAttention`).

Three things make tfmot's wrappers compose with the rest of the toolkit:

- **Schedule per update.** The wrappers advance `pruning_step` on every training call;
  the accumulating train_step calls the model once per micro-batch, so the step is
  pinned to `optimizer.iterations` (`compress.hooks`).
- **Mask updates once per update, outside the micro-batch loop.** Under a
  `tf.distribute` strategy tfmot updates masks and masks weights through
  `merge_call`, which cannot run inside the accumulator's `tf.while_loop`. The first
  micro-batch of a step runs outside the loop and does both; inside the loop they are
  skipped. That is exact: no weight changes between micro-batches, and a mask
  computed twice at one step from the same weights is the same mask.
- **Mixed precision.** Each wrapper keeps its layer's dtype policy (not the global
  one), and masks are computed from, and applied to, the float32 master weights
  outside the autocast scope (`PruneLowMagnitudeFloat32`): tfmot's own masking would
  round them to bfloat16/float16 on every step, and fails on the float32 Embedding
  table.
"""

import contextlib
import fnmatch
import functools

import tensorflow as tf

from tf_effitrain.compress import hooks  # noqa: F401  registers the step pin
from tf_effitrain.compress._tfmot import tfmot, tfmot_internal
from tf_effitrain.config.schema import PruningConfig
from tf_effitrain.training.accumulation import register_micro_loop_scope

__all__ = ["DEFAULT_LAYERS", "pruning_schedule", "prune", "strip", "sparsity_table",
           "pruning_wrappers", "selected_layers", "PRUNABLE_KINDS"]

# The encoder's Dense layers (attention projections, FFN) and the factorized
# embedding's projection; the classifier head and the token embedding are opt-in.
DEFAULT_LAYERS = tuple(PruningConfig().layers)  # one list: the config's default
PRUNABLE_KINDS = ("Dense", "Embedding", "LowRankDense")
SCHEDULES = ("polynomial", "constant")


def _check_fraction(name, value, low=0.0, high=1.0):
    if not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"`{name}` must be a number in [{low}, {high}). "
                         f"Received: {name}={value!r}")


def pruning_schedule(target_sparsity, schedule="polynomial", begin_step=0, end_step=None,
                     frequency=10, initial_sparsity=0.0):
    """A tfmot pruning schedule counted in applied updates.

    Args:
        target_sparsity: float in [0, 1). Share of each kernel's weights set to zero.
        schedule: str. `"polynomial"` (sparsity rises from `initial_sparsity` at
            `begin_step` to `target_sparsity` at `end_step`, cubic) or `"constant"`
            (`target_sparsity` from `begin_step` on).
        begin_step: int. First update that prunes.
        end_step: int or None. Polynomial: the update where the target is reached
            (required). Constant: last pruning update (None: never stops).
        frequency: int. Masks are recomputed every `frequency` updates.
        initial_sparsity: float. Polynomial: sparsity at `begin_step`.

    Returns:
        A `tfmot.sparsity.keras.PruningSchedule`.
    """
    _check_fraction("target_sparsity", target_sparsity)
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}. "
                         f"Received: schedule={schedule!r}")
    if not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"`frequency` must be an integer >= 1. Received: frequency={frequency!r}")
    if not isinstance(begin_step, int) or begin_step < 0:
        raise ValueError(f"`begin_step` must be an integer >= 0. Received: begin_step={begin_step!r}")
    sparsity = tfmot().sparsity.keras
    if schedule == "constant":
        return sparsity.ConstantSparsity(target_sparsity, begin_step,
                                         end_step=-1 if end_step is None else end_step,
                                         frequency=frequency)
    if end_step is None or end_step <= begin_step:
        raise ValueError("A polynomial schedule needs `end_step` > `begin_step` (the update "
                         f"where the target is reached). Received: begin_step={begin_step}, "
                         f"end_step={end_step}")
    _check_fraction("initial_sparsity", initial_sparsity, high=target_sparsity + 1e-12)
    return sparsity.PolynomialDecay(initial_sparsity, target_sparsity, begin_step, end_step,
                                    frequency=frequency)


def _kind(layer):
    return type(layer).__name__


def selected_layers(model, layers, embedding, head):
    """Names of the layers `prune` wraps in `model` for these settings, and the
    patterns that matched no layer."""
    patterns = list(layers) + (["token_embedding"] if embedding else []) + (
        ["logits"] if head else [])
    chosen, unmatched = [], set(patterns)
    for layer in model.layers:
        hits = [p for p in patterns if fnmatch.fnmatchcase(layer.name, p)]
        unmatched -= set(hits)
        if hits and _kind(layer) in PRUNABLE_KINDS:
            chosen.append(layer.name)
    return chosen, sorted(unmatched)


def _check_model(model):
    import tf_keras

    inner = getattr(model, "model", None)
    if isinstance(inner, tf_keras.Model) and hasattr(model, "accumulation_steps"):
        raise ValueError("Prune the model, then wrap it: `et.accumulate(et.prune(model, "
                         "...)[0], k)`. Received: a gradient accumulator.")
    if not isinstance(model, tf_keras.Model):
        raise ValueError(
            "tfmot pruning needs a tf_keras model (tfmot does not support Keras 3). Build "
            "it with `et.build_transformer_classifier(..., keras=et.get_keras('tf_keras'))`"
            "; for a Keras 3 run use `tf-effitrain compress RUN_DIR --set "
            "compression.pruning.target_sparsity=0.5`, which copies the weights into the "
            f"tf_keras twin. Received: {type(model).__module__}.{type(model).__name__}")
    if not getattr(model, "_is_graph_network", False):
        raise ValueError("tfmot pruning needs a functional (or Sequential) model: a "
                         f"subclassed model cannot be cloned. Received: {type(model).__name__}")


def prune(model, target_sparsity=0.5, schedule="polynomial", begin_step=0, end_step=None,
          frequency=10, initial_sparsity=0.0, m_by_n=None, layers=DEFAULT_LAYERS,
          embedding=False, head=False):
    """Wraps a tf_keras model's Dense (and optionally Embedding) layers for pruning.

    Args:
        model: a built functional tf_keras model (e.g. the toolkit's builder with
            `keras=et.get_keras("tf_keras")`).
        target_sparsity: float in [0, 1). Unstructured: share of each kernel set to
            zero. Ignored with `m_by_n` (2:4 is 50%).
        schedule: str. `"polynomial"` or `"constant"`; see `pruning_schedule`.
        begin_step: int. First pruning update (counted in applied updates).
        end_step: int or None. Update where the target is reached (polynomial).
        frequency: int. Updates between mask recomputations.
        initial_sparsity: float. Polynomial: sparsity at `begin_step`.
        m_by_n: tuple `(m, n)` or None. Structured m:n sparsity (`(2, 4)`: in every
            group of 4 consecutive input weights of an output unit, 2 are zero), set
            at the first update (tfmot; `begin_step` must be 0); sparsity-aware
            hardware runs it faster.
        layers: list of str. `fnmatch` patterns on layer names; layers of other kinds
            (norms, the attention core) are skipped. Default: the encoder's Dense
            layers and the embedding projection.
        embedding: bool. Also prune the token embedding table.
        head: bool. Also prune the classifier head (`logits`).

    Returns:
        `(pruned_model, callbacks)`: a new tf_keras model built on `model`'s layers
        (it shares their weights: training it changes `model` too), and the callbacks
        `fit` needs (`UpdatePruningStep`). Compile the pruned model (or `et.accumulate` it);
        `et.strip` it after training.

    Example:

    ```python
    pruned, callbacks = et.prune(model, target_sparsity=0.8, end_step=2000)
    pruned.compile(optimizer=..., loss=..., metrics=["accuracy"])
    pruned.fit(train, epochs=3, callbacks=callbacks)
    final = et.strip(pruned)  # plain tf_keras model, 80% zeros per kernel
    ```
    """
    import tf_keras

    _check_model(model)
    chosen, unmatched = selected_layers(model, layers, embedding, head)
    # The defaults cover model variants (a factorized embedding or not): only a
    # pattern the user wrote must match.
    unmatched = [p for p in unmatched if p not in DEFAULT_LAYERS]
    if unmatched or not chosen:
        names = [layer.name for layer in model.layers if _kind(layer) in PRUNABLE_KINDS]
        raise ValueError(f"Pruning `layers` patterns match no prunable layer. Prunable "
                         f"layers: {names}. Received: layers={unmatched or list(layers)}")
    shared = [name for name in chosen if len(model.get_layer(name)._inbound_nodes) > 1]
    if shared:
        # tfmot advances a wrapper's step on every call: a layer called once per block
        # would run the schedule ahead and change its mask within one forward pass.
        raise ValueError("tfmot pruning cannot wrap a layer called more than once per "
                         "forward pass (`model.share_layers`): its step counter advances "
                         "per call. Prune a model without shared blocks, or use "
                         "`compression.structured`. Received: shared layers "
                         f"{shared}")
    if m_by_n is not None:
        m_by_n = tuple(m_by_n)
        if len(m_by_n) != 2 or not all(isinstance(v, int) for v in m_by_n) or \
                not 0 < m_by_n[0] < m_by_n[1]:
            raise ValueError("`m_by_n` must be two integers (m, n) with 0 < m < n, e.g. "
                             f"(2, 4). Received: m_by_n={m_by_n!r}")
        if begin_step:
            # tfmot sets the m:n mask at the first update, whatever the schedule says.
            raise ValueError("m:n sparsity is set at the first update: `begin_step` must "
                             f"be 0 with `m_by_n`. Received: begin_step={begin_step}")
        sched = pruning_schedule(0.5, "constant", 0, None, frequency)
    else:
        sched = pruning_schedule(target_sparsity, schedule, begin_step, end_step, frequency,
                                 initial_sparsity)
    wrapper = _wrapper_class()
    options = {"pruning_schedule": sched, "sparsity_m_by_n": m_by_n}

    def wrap(layer):
        if layer.name not in chosen:
            return layer
        # The wrapper would take the global policy; it keeps the layer's own.
        return wrapper(layer, dtype=layer.dtype_policy, **options)

    pruned = tf_keras.models.clone_model(model, clone_function=wrap)
    return pruned, [tfmot().sparsity.keras.UpdatePruningStep()]


@functools.lru_cache(maxsize=None)
def _wrapper_class():
    """tfmot's `PruneLowMagnitude`, with masks computed from and applied to the
    float32 weights, and a switch for the accumulator's micro-batch loop."""
    from tf_keras.src.mixed_precision import autocast_variable

    base = tfmot_internal("sparsity.keras.pruning_wrapper").PruneLowMagnitude

    class PruneLowMagnitudeFloat32(base):
        """Under a mixed policy the wrapper's call runs in an autocast scope: tfmot would
        read each kernel as bfloat16/float16, rank those rounded magnitudes, and write
        `weight * mask` back, rounding the float32 master weights to an 8-bit mantissa
        on every step (small updates lost); a float32 Embedding table fails outright
        (`Mul` of float32 by a bfloat16 mask). Here both run outside the autocast
        scope, and not at all while `in_micro_loop` (see `_masks_outside_loop`)."""

        in_micro_loop = False

        def build(self, input_shape):
            super().build(input_shape)
            obj = self.pruning_obj
            for name in ("conditional_mask_update", "weight_mask_op"):
                setattr(obj, name, self._outside_autocast(getattr(obj, name)))

        def _outside_autocast(self, method):
            def run():
                if self.in_micro_loop:
                    return tf.no_op()
                with autocast_variable.enable_auto_cast_variables(None):
                    return method()
            return run

    return PruneLowMagnitudeFloat32


def layers_within(model):
    """Every layer anywhere in `model` (nested models, an accumulator's `.model`), each
    once."""
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
        inner = getattr(layer, "model", None)
        if inner is not None:
            stack.append(inner)
    return found


def pruning_wrappers(model):
    """The `PruneLowMagnitude` wrappers anywhere in `model` (or its accumulator)."""
    return [layer for layer in layers_within(model) if hasattr(layer, "pruning_obj")]


def strip(model):
    """The trained model without pruning wrappers, final masks applied.

    Args:
        model: a pruned tf_keras model, or a gradient accumulator / distiller
            holding one (`.model` / `.student`).

    Returns:
        A plain tf_keras model whose pruned kernels hold exact zeros.
    """
    for attr in ("student", "model"):
        inner = getattr(model, attr, None)
        if inner is not None and hasattr(model, "accumulation_steps"):
            model = inner
            break
    for wrapper in pruning_wrappers(model):
        # The last update ran after the last masking: apply the masks once more
        # (directly: tfmot's masking op needs a replica context of the variables'
        # strategy).
        for weight, mask, _ in wrapper.pruning_vars:
            weight.assign(weight.numpy() * mask.numpy())
    return tfmot().sparsity.keras.strip_pruning(model)


def sparsity_table(model):
    """Per-kernel sparsity: a list of `{"layer", "weight", "shape", "zeros", "size",
    "sparsity"}` for every Dense / Embedding / LowRankDense kernel of `model`."""
    import numpy as np

    rows = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if _kind(inner) not in PRUNABLE_KINDS:
            continue
        for var in inner.weights:
            short = var.name.split("/")[-1].split(":")[0]
            if short not in ("kernel", "embeddings", "kernel_a", "kernel_b"):
                continue
            value = np.asarray(var.numpy())
            zeros = int(np.sum(value == 0))
            rows.append({"layer": layer.name, "weight": short, "shape": list(value.shape),
                         "zeros": zeros, "size": int(value.size),
                         "sparsity": zeros / max(value.size, 1)})
    return rows


@register_micro_loop_scope
@contextlib.contextmanager
def _masks_outside_loop(model):
    """While the accumulator traces its micro-batch loop: no mask update and no
    masking op in the wrappers (their `merge_call` cannot run in a `while_loop`)."""
    wrappers = [w for w in pruning_wrappers(model) if hasattr(w, "in_micro_loop")]
    for w in wrappers:
        w.in_micro_loop = True
    try:
        yield
    finally:
        for w in wrappers:
            w.in_micro_loop = False
