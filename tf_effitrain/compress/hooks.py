"""Pins tfmot's per-call pruning counters to applied optimizer updates.

tfmot's pruning wrappers advance `pruning_step` on every training call. The
accumulating train_step calls the model once per micro-batch, so without this the mask
schedule would run `accumulation_steps` times too fast. The hook sets every wrapper's
step to the update count before each micro-batch and after the update. It finds
wrappers by their `pruning_step` variable, so tfmot itself is not imported here.
"""

import tensorflow as tf

from tf_effitrain.training.accumulation import register_update_count_hook

__all__ = ["pruning_steps", "pin_pruning_steps"]


def pruning_steps(model):
    """The `pruning_step` variables of tfmot pruning wrappers anywhere in `model`."""
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        step = getattr(layer, "pruning_step", None)
        if isinstance(step, tf.Variable):
            found.append(step)
        stack.extend(getattr(layer, "layers", []) or [])
    return found


@register_update_count_hook
def pin_pruning_steps(model, updates):
    """Sets each pruning wrapper's `pruning_step` in `model` to `updates`."""
    for step in pruning_steps(model):
        step.assign(tf.cast(updates, step.dtype))
