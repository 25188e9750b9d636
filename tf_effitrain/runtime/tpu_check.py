"""Before training under TPUStrategy: find what would fail or crawl on a TPU.

Each problem is one line that names what is wrong and the fix. Checked: static shapes
(packing, or fixed padding with `drop_remainder`; no unknown dimension in the training
batches), int32
inputs, no Python functions in the pipeline (`tf.py_function` cannot run on a TPU
host), and, on a TPU node (the TPU host is another machine), files read inside tf.data
must be on Cloud Storage (`gs://`).
"""

import os

__all__ = ["check_tpu_readiness", "is_tpu_node"]

_PY_FUNCS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
_FILE_READERS = {"TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset",
                 "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2", "MatchingFiles"}


def is_tpu_node(environ=None, tpu_address=None):
    """A TPU node runtime: the TPU host is remote (Colab's older TPU runtime, grpc://)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("COLAB_TPU_ADDR")) or bool(tpu_address and tpu_address != "local")


def _graph_nodes(dataset):
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    nodes = list(graph.node)
    for function in graph.library.function:
        nodes.extend(function.node_def)
    return nodes


def _local_files(nodes):
    """Paths that a pipeline with file-reading ops reads from outside Cloud Storage.

    File names reach the readers through function arguments (a file list becomes a
    dataset of names), so every string constant of a pipeline that reads files and
    looks like a path (has a "/" or exists) counts.
    """
    if not any(node.op in _FILE_READERS for node in nodes):
        return []
    strings = [v.decode("utf-8", "replace") for node in nodes if node.op == "Const"
               for v in node.attr["value"].tensor.string_val]
    return [v for v in strings if v and not v.startswith("gs://")
            and ("/" in v or os.path.exists(v))]


def check_tpu_readiness(config, dataset=None, environ=None):
    """The problems that stop or slow training on a TPU (empty when ready).

    Args:
        config: `ExperimentConfig`.
        dataset: the batched training `tf.data.Dataset` of `(token_ids, labels)`, or None
            to check the config only.
        environ: mapping or None. Environment (tells a TPU node from a TPU VM).

    Returns:
        list of str, one per problem, each with its fix.
    """
    import tensorflow as tf

    problems = []
    data = config.data
    if data.batching not in ("fixed", "pack"):
        problems.append(
            f"`data.batching` is {data.batching!r}: batch shapes change with sequence "
            "length and XLA compiles a program per shape. Set `data.batching: pack` "
            "(static shapes, almost no padding) or `fixed`.")
    # Packed batches are always complete (a short last batch gets empty rows).
    if data.batching != "pack" and not data.drop_remainder:
        problems.append(
            "`data.drop_remainder` is false: the last training batch is smaller, a new "
            "shape. Set `data.drop_remainder: true`.")
    if dataset is None:
        return problems
    features = tf.nest.flatten(dataset.element_spec)
    dynamic = [str(spec.shape) for spec in features if not spec.shape.is_fully_defined()]
    if dynamic and (data.batching == "pack" or (data.batching == "fixed"
                                                 and data.drop_remainder)):
        problems.append(
            f"Training batches have unknown dimensions {dynamic}: give every tensor a "
            "static shape (fixed padding, `drop_remainder=True`).")
    inputs = dataset.element_spec[0] if isinstance(dataset.element_spec, tuple) else None
    # Dict inputs (e.g. token ids with precomputed teacher logits): the ids by name.
    ids = inputs["token_ids"] if isinstance(inputs, dict) and "token_ids" in inputs else (
        features[0])
    if ids.dtype != tf.int32:
        problems.append(
            f"Token ids are {ids.dtype.name}: TPUs take int32 inputs. Cast them with "
            "`tf.cast(ids, tf.int32)` in the pipeline.")
    nodes = _graph_nodes(dataset)
    if any(node.op in _PY_FUNCS for node in nodes):
        problems.append(
            "The input pipeline calls Python (`tf.py_function` / `tf.numpy_function`), "
            "which cannot run on a TPU host. Rewrite that step with TensorFlow ops or do "
            "it before building the dataset.")
    if is_tpu_node(environ, config.runtime.tpu_address):
        local = _local_files(nodes)
        if local:
            problems.append(
                f"The pipeline reads local files {local[:3]} on a TPU node, whose host "
                "cannot see this machine's disk. Copy them to Cloud Storage (gs://...).")
    return problems
