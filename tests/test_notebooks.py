"""The Colab notebooks run top to bottom (on CPU, with a tiny model, no TPU)."""

import json
import os

import pytest

from harness import REPO

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "notebooks")) if f.endswith(".ipynb"))
TINY_OVERRIDES = [
    "data.vocab_size=300", "data.max_length=32", "data.batch_size=16", "model.num_layers=1",
    "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64", "training.epochs=1",
    "runtime.precision=float32", "training.jit_compile=false", "training.verbose=0",
]


def _code_cells(name):
    with open(os.path.join(REPO, "notebooks", name), encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])]
    assert tagged, f"{name} needs a code cell tagged `parameters`"
    return cells, tagged[0]


def _run(name, injected, upto=None):
    cells, parameters = _code_cells(name)
    namespace = {}
    for i, cell in enumerate(cells[:upto]):
        exec(compile("".join(cell["source"]), f"{name}[{i}]", "exec"), namespace)
        if i == parameters:  # like papermill: a cell injected after the parameters
            exec(injected, namespace)
    return namespace


def test_every_notebook_has_a_parameters_cell_first():
    assert set(NOTEBOOKS) == {"colab_tpu_quickstart.ipynb", "distill.ipynb",
                              "prune_and_quantize.ipynb"}
    for name in NOTEBOOKS:
        assert _code_cells(name)[1] == 0, name


def test_quickstart_runs_on_cpu_from_outside_the_checkout(small_jsonl, tmp_path,
                                                          monkeypatch, capsys):
    """Started elsewhere (as after a Colab runtime restart, with the clone present), the
    setup changes into the checkout, so the configs' relative paths resolve."""
    name = "colab_tpu_quickstart.ipynb"
    monkeypatch.chdir(tmp_path)
    injected = (f"REPO_DIR = {REPO!r}\n" + "OVERRIDES = " + repr(
        [f"data.path={small_jsonl}", f"training.run_dir={tmp_path / 'run'}",
         *TINY_OVERRIDES]))
    _run(name, injected)
    out = capsys.readouterr().out
    assert f"working directory: {REPO}" in out and "tf_effitrain: already installed (" in out
    assert "test accuracy" in out and "default x1" in out and "int8: accuracy" in out
    assert os.path.isfile(tmp_path / "run" / "model.keras")


def test_quickstart_without_a_checkout_or_url_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="set REPO_URL in the first cell"):
        _run("colab_tpu_quickstart.ipynb", "", upto=2)


def test_distill_notebook_runs_on_cpu(small_jsonl, tmp_path, monkeypatch, capsys):
    """Teacher, distilled student, scratch student, comparison and int8 export, tiny."""
    monkeypatch.chdir(tmp_path)
    data = [f"data.path={small_jsonl}", "data.vocab_size=300", "data.max_length=32",
            "data.batch_size=16", "training.epochs=1", "training.verbose=0"]
    teacher = [*data, f"training.run_dir={tmp_path / 'teacher'}", "model.num_layers=1",
               "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64"]
    student = [*data, f"training.run_dir={tmp_path / 'student'}", "model.num_layers=1",
               "model.d_model=8", "model.num_heads=2", "model.ffn_dim=16",
               "model.embedding_rank=4"]
    _run("distill.ipynb", f"REPO_DIR = {REPO!r}\nTEACHER_OVERRIDES = {teacher!r}\n"
                          f"STUDENT_OVERRIDES = {student!r}")
    out = capsys.readouterr().out
    assert "teacher: test accuracy" in out and "distilled student: test accuracy" in out
    assert "student from scratch: test accuracy" in out and "student int8: accuracy" in out
    assert "keeps" in out and "x its parameters" in out
    for run in ("teacher", "student", "student_scratch"):
        assert os.path.isfile(tmp_path / run / "model.keras"), run
    assert os.path.isfile(tmp_path / "student" / "export" / "model_int8.tflite")


def test_prune_and_quantize_notebook_runs_on_cpu(small_jsonl, tmp_path, monkeypatch, capsys):
    """Float model, two levels (pruning, pruning + QAT), the table and the plot, tiny."""
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.path={small_jsonl}", *TINY_OVERRIDES]
    levels = {"prune 50%": ["compression.pruning.target_sparsity=0.5"],
              "prune 50% + qat int8": ["compression.pruning.target_sparsity=0.5",
                                       "compression.qat=true"]}
    _run("prune_and_quantize.ipynb",
         f"REPO_DIR = {REPO!r}\nOVERRIDES = {overrides!r}\n"
         f"RUN_DIR = {str(tmp_path / 'float')!r}\nLEVELS = {levels!r}\nFINE_TUNE_EPOCHS = 1")
    out = capsys.readouterr().out
    assert "float model: test accuracy" in out
    assert "prune 50% + qat int8" in out and "vs float" in out
    assert os.path.isfile(tmp_path / "float_prune_50_qat_int8" / "model_int8.tflite")
    assert os.path.isfile(tmp_path / "float" / "prune_and_quantize.png")
