"""One worker of a two-process MultiWorkerMirroredStrategy input test (TF_CONFIG from env).

Usage: python multiworker_stream.py PATTERN OUT
Streams the training split of the JSONL shards PATTERN (hash split) through
`strategy.distribute_datasets_from_function` and writes the texts this worker read, and
its input pipeline id, to OUT_<worker index>.json.
"""

import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The strategy must exist before any other TensorFlow op runs.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

from tf_effitrain.config import DataConfig  # noqa: E402
from tf_effitrain.data.stream import scan, stream_examples  # noqa: E402


def main(pattern, out):
    cfg = DataConfig(path=pattern, stream=True)
    info = scan(cfg)
    pipelines = []

    def dataset_fn(context):
        pipelines.append(context.input_pipeline_id)
        return stream_examples(cfg, info, "train", context).batch(2)

    texts = []
    for batch in strategy.distribute_datasets_from_function(dataset_fn):
        for local in strategy.experimental_local_results(batch[0]):
            texts += [t.decode() for t in local.numpy()]
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with open(f"{out}_{index}.json", "w") as f:
        json.dump({"pipelines": pipelines, "texts": texts}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
