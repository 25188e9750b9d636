"""One worker of a two-process MultiWorkerMirroredStrategy run (TF_CONFIG from env).

Usage: python multiworker_accumulate.py ENGINE[,ENGINE] OUT NAME [NAME ...]
For each engine and optimizer NAME, trains the same model on the same batch as
test_accumulation.py for 3 updates with 4-step accumulation; the chief writes the
weights to OUT_<engine>_<NAME>.npz. The NAME `distill` trains test_distill.py's
Distiller (AdamW, hidden-state term, 2 updates, k=4) and writes the student's weights.
The NAME `pack` (Keras 3 only) trains test_packing.py's packed twin on packed rows (SGD,
k=2, 2 updates) and writes the plain model's weights. The NAME `prune` (tf_keras only) trains test_pruning.py's model with tfmot pruning to
80% (k=2, 4 updates); every worker writes its stripped weights to
OUT_tf_keras_prune_<worker>.npz.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The strategy must exist before any other TensorFlow op runs.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import test_accumulation as T  # noqa: E402
from tf_effitrain.engine import get_keras  # noqa: E402


def main(engines, out, *names):
    x, y, sw = T._batch(24)
    options = tf.data.Options()
    # Each global batch of 24 is split into one 12-example part per worker.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    chief = json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0
    for engine in engines.split(","):
        keras = get_keras(engine)
        for name in names:
            if name == "prune":
                if engine != "tf_keras":
                    continue
                import test_pruning as P
                from tf_effitrain.compress import prune, strip

                with strategy.scope():
                    pruned, _ = prune(P._model(), 0.8, "polynomial", 0, 4, frequency=1)
                trainable, _ = P._fit(pruned, k=2, strategy=strategy)
                index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
                np.savez(f"{out}_{engine}_prune_{index}.npz", *strip(trainable).get_weights())
                continue
            if name == "pack":
                if engine != "keras3":
                    continue
                import test_packing as K

                ids, labels, _ = K._examples(20)
                model, _ = K._packed_fit(keras, ids, labels, k=2, strategy=strategy,
                                         options=options)
                if chief:
                    np.savez(f"{out}_{engine}_pack.npz", *model.get_weights())
                continue
            if name == "distill":
                import test_distill as D

                model, _ = D._distilled(keras, x, y, sw, k=4, hidden=True,
                                        strategy=strategy, options=options)
            else:
                model, _ = T._accumulated(keras, name, x, y, sw, steps=3, k=4,
                                          strategy=strategy, options=options)
            if chief:
                np.savez(f"{out}_{engine}_{name}.npz", *model.model.get_weights())


if __name__ == "__main__":
    main(*sys.argv[1:])
