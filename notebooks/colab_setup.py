"""Installs tf_effitrain in a notebook runtime (Colab), keeping a supported TensorFlow.

The notebooks' setup cell clones the repository, then runs this file (it needs nothing
but the standard library: on a fresh runtime the package is not installed yet):

    sys.path.insert(0, os.path.join(REPO, "notebooks"))
    from colab_setup import install
    print("tf_effitrain:", install(REPO))
"""

import os
import subprocess
import sys

__all__ = ["install"]


def _tpu_runtime():
    return any(os.environ.get(v) for v in ("COLAB_TPU_ADDR", "TPU_NAME",
                                            "TPU_ACCELERATOR_TYPE")) or bool(
        [d for d in os.listdir("/dev") if d.startswith("accel")] if os.path.isdir("/dev") else [])


def install(repo):
    """`pip install -e repo`, keeping a preinstalled, supported TensorFlow."""
    from importlib.metadata import PackageNotFoundError, version

    try:  # installed means pip-installed (a clone on sys.path is not: no dependencies)
        return f"already installed ({version('tf_effitrain')})"
    except PackageNotFoundError:
        pass
    try:
        tf_version = version("tensorflow")
    except PackageNotFoundError:
        tf_version = None
    if tf_version is None and _tpu_runtime():
        raise RuntimeError(
            "This TPU runtime has no TensorFlow, and the `tensorflow` wheel from PyPI "
            "cannot see TPUs. Install the TPU build first (`pip install "
            "'tensorflow-tpu==2.21.*' -f https://storage.googleapis.com/libtpu-tf-releases/"
            "index.html`), restart the session, and run this cell again.")
    command = [sys.executable, "-m", "pip", "install", "-q", "-e", repo]
    if tf_version and tf_version.startswith("2.21."):  # the range setup.cfg pins
        constraints = os.path.join(repo, ".colab-constraints.txt")
        with open(constraints, "w") as f:
            f.write(f"tensorflow=={tf_version}\n")
        command += ["-c", constraints]
        note = f"kept the preinstalled TensorFlow {tf_version}"
    else:
        note = (f"TensorFlow {tf_version or '(none)'} is outside the tested 2.21 range: "
                "installed 2.21; restart the runtime (Runtime > Restart session), then "
                "run all cells again")
    subprocess.run(command, check=True)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return note
