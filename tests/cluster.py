"""A local TF_CONFIG cluster of test processes on 127.0.0.1 (no TensorFlow imported here:
worker scripts import this before their strategy exists)."""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cluster(argv, workers=2, timeout=300):
    """Runs `argv` as every worker of a local TF_CONFIG cluster on 127.0.0.1.

    Ports are chosen free; every process is killed if the cluster outlives `timeout`.

    Returns:
        list of `(returncode, output)`, one per worker, in task order.
    """
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    procs = []
    try:
        for index in range(workers):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1",
                       TF_CONFIG=json.dumps({"cluster": {"worker": addresses},
                                             "task": {"type": "worker", "index": index}}))
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO,
                                          stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # never leave a worker behind, even on a timeout
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]
