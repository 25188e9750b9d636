"""The run directory's life cycle: new, running (resumable), finished.

`train` decides what to do with its run directory before it writes anything:

- no directory, or one without a run: a fresh run;
- a finished run: refused, unless `overwrite` (its artifacts are then removed);
- an unfinished run (killed, interrupted, failed): resumed from its newest good
  checkpoint when `resume="auto"` and the config is the same one (bar the keys in
  `RESUMABLE_CHANGES`), else refused with the keys that differ.

`run.json` records the status; runs written before it existed count as finished when
they hold `model.keras` or `report.md`. Nothing here imports TensorFlow.
"""

import json
import os
import shutil
import time

from tf_effitrain.errors import RunDirError

__all__ = ["RUN_STATE_FILE", "RUN_ARTIFACTS", "RESUMABLE_CHANGES", "RESUME_MODES",
           "run_status", "plan_run_dir", "clear_run_artifacts", "write_run_state",
           "config_differences", "atomic_write", "atomic_write_text", "lock_run_dir"]

RUN_STATE_FILE = "run.json"
RESUME_MODES = ("auto", "never")
# Everything `train` and its plugins write into a run directory (removed by
# `--overwrite`; other files are left alone).
RUN_ARTIFACTS = ("config.yaml", "vocab.txt", "metrics.jsonl", "logs", "checkpoints",
                 "model.keras", "report.md", "curves.png", "tokenizer.json",
                 "compression.json", "export", "model_int8.tflite", "stage1", "stage2",
                 "stage3", "stage4", "stage5", "stage6", RUN_STATE_FILE)
# Keys a resumed run may change: how long and where it runs, how it reports and saves.
# (`training.epochs` also changes the length of the learning-rate schedule; a change of
# strategy that changes the global batch is refused by the checkpoint itself.)
RESUMABLE_CHANGES = ("training.epochs", "training.verbose", "training.run_dir",
                     "training.checkpoint_every", "training.keep_checkpoints",
                     "training.nonfinite", "runtime.strategy", "runtime.tpu_address")
LOCK_FILE = "run.lock"


def atomic_write(path, write):
    """Calls `write(f)` on a temporary binary file, flushes it to disk and renames it to
    `path`: a reader sees the old content or the new, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text):
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_run_state(run_dir, status, **info):
    """Records the run's `status` ("running" or "finished") in `run.json`."""
    state = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    atomic_write_text(os.path.join(run_dir, RUN_STATE_FILE), json.dumps(state, indent=2))


def run_status(run_dir):
    """`"new"`, `"running"` (an unfinished run) or `"finished"`."""
    if not os.path.isdir(run_dir):
        return "new"
    path = os.path.join(run_dir, RUN_STATE_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                status = json.load(f).get("status")
        except (OSError, ValueError, AttributeError):
            status = "running"  # a damaged state file: treat the run as unfinished
        return "finished" if status == "finished" else "running"
    if any(os.path.exists(os.path.join(run_dir, name)) for name in ("model.keras", "report.md")):
        return "finished"  # written before run.json existed
    if any(os.path.exists(os.path.join(run_dir, name))
           for name in ("config.yaml", "metrics.jsonl", "checkpoints")):
        return "running"  # something of a run that never finished
    return "new"


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(before, after):
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(before), _flatten(after)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def plan_run_dir(run_dir, config, resume="auto", overwrite=False):
    """Decides between a fresh run and a resumed one, before anything is written.

    Args:
        run_dir: str. The run directory.
        config: `ExperimentConfig`. The new run's config.
        resume: str. `"auto"` resumes an unfinished run of the same config; `"never"`
            does not (an unfinished run is then replaced only with `overwrite`).
        overwrite: bool. Replace a finished (or unfinished) run.

    Returns:
        `"fresh"` or `"resume"`.

    Raises:
        RunDirError: the directory holds a run that must not be replaced.
    """
    from tf_effitrain.config import ConfigError, load_config

    if resume not in RESUME_MODES:
        raise ValueError(f"`resume` must be one of {RESUME_MODES}. Received: resume={resume!r}")
    status = run_status(run_dir)
    if status == "new" or overwrite:
        return "fresh"
    if status == "finished":
        extend = ""
        try:
            saved = load_config(os.path.join(run_dir, "config.yaml")).to_dict()
            if config_differences(saved, config.to_dict()) == ["training.epochs"]:
                extend = (" A finished run is not extended by a larger `training.epochs` "
                          "(its schedule has ended); train a new run instead.")
        except (ConfigError, OSError):
            pass
        raise RunDirError(
            f"{run_dir!r} holds a finished run. Pass `--overwrite` to replace it, or "
            f"choose another `--run-dir`.{extend}")
    if resume == "never":
        raise RunDirError(
            f"{run_dir!r} holds an unfinished run. Resume it (`--resume auto`), or pass "
            "`--overwrite` to start over.")
    try:
        saved = load_config(os.path.join(run_dir, "config.yaml")).to_dict()
    except (ConfigError, OSError) as e:
        raise RunDirError(
            f"{run_dir!r} holds an unfinished run whose config.yaml cannot be read ({e}). "
            "Pass `--overwrite` to start over.") from None
    now = config.to_dict()
    changed = [k for k in config_differences(saved, now) if k not in RESUMABLE_CHANGES]
    if changed:
        flat_saved, flat_now = _flatten(saved), _flatten(now)
        shown = "; ".join(f"{k}: {flat_saved.get(k)!r} (run) vs {flat_now.get(k)!r} (now)"
                          for k in changed[:4])
        raise RunDirError(
            f"{run_dir!r} holds an unfinished run of another config ({shown}"
            f"{'; ...' if len(changed) > 4 else ''}). Use the same config to resume it, "
            "`--overwrite` to start over, or another `--run-dir`.")
    return "resume"


def clear_run_artifacts(run_dir, names=RUN_ARTIFACTS):
    """Removes what a previous run wrote (`names`, default `RUN_ARTIFACTS`); other files
    stay."""
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def lock_run_dir(run_dir):
    """Holds an exclusive lock on `run_dir` for this process (released when the returned
    file is closed or the process ends); a second `train` in the same directory fails
    instead of writing into the first one's run."""
    import fcntl

    f = open(os.path.join(run_dir, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunDirError(
            f"Another `tf-effitrain` process is training in {run_dir!r}. Wait for it, "
            "stop it, or choose another `--run-dir`.") from None
    return f
