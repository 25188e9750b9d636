"""Where a training step's time goes: TensorFlow profiler traces summed by op type.

`profile_steps` traces a few calls of a function with `tf.profiler` and `op_table`
sums the trace's kernel events (the `tf_Compute` threads of the host CPU plane) by op
type (the part after the last `:` of an event name, e.g. `_MklMatMul`, `Erfc`), per
step. Op times of the two intra-op threads add up, so the total can exceed the wall time.
"""

import collections
import glob
import os
import shutil
import tempfile

__all__ = ["profile_steps", "op_table", "MATMUL_OPS"]

# Op types that are matrix multiplications (what model FLOPs count).
MATMUL_OPS = ("MatMul", "_MklMatMul", "BatchMatMulV2", "_MklBatchMatMulV2", "Einsum",
              "_MklNativeFusedMatMul", "_MklFusedMatMul", "_MklNativeBatchMatMulV2")


def op_table(logdir, steps):
    """`[{"op", "ms_per_step", "calls_per_step", "share"}]`, largest first.

    Args:
        logdir: str. A `tf.profiler.experimental.start` directory.
        steps: int. Steps traced (times are divided by it).
    """
    try:  # TensorFlow's own (private) protobuf module for its profiler traces
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError as e:
        raise RuntimeError(
            "This TensorFlow has no `tensorflow.tsl.profiler.protobuf.xplane_pb2` to read "
            "profiler traces (tested with TensorFlow 2.21); open the trace in "
            f"{logdir!r} with TensorBoard's profiler instead.") from e

    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"No profiler trace under {logdir!r}.")
    space = xplane_pb2.XSpace()
    with open(paths[0], "rb") as f:
        space.ParseFromString(f.read())
    ms, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                # Kernels are `scope/name:OpType`; `ExecutorState::Process` and the
                # like are the executor's own spans around them.
                if ":" not in name or "::" in name:
                    continue
                op = name.rsplit(":", 1)[1]
                ms[op] += event.duration_ps / 1e9
                calls[op] += 1
    total = sum(ms.values()) or 1.0
    return [{"op": op, "ms_per_step": t / steps, "calls_per_step": calls[op] / steps,
             "share": t / total} for op, t in ms.most_common()]


def profile_steps(step, steps=3):
    """Runs `step()` `steps` times under the profiler; returns `op_table`'s rows."""
    import tensorflow as tf

    logdir = tempfile.mkdtemp(prefix="tf_effitrain_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(steps):
                step()
        finally:
            tf.profiler.experimental.stop()
        return op_table(logdir, steps)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
