"""The Colab notebooks run top to bottom (on CPU, with a tiny model, no TPU)."""

import json
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "notebooks")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, small_jsonl, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with open(os.path.join(REPO, "notebooks", name), encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])]
    assert tagged, f"{name} needs a code cell tagged `parameters`"
    # Like papermill: a cell injected after the parameters cell overrides them.
    injected = "OVERRIDES = " + repr([
        f"data.path={small_jsonl}", f"training.run_dir={tmp_path}", "data.vocab_size=300",
        "data.max_length=32", "data.batch_size=16", "model.num_layers=1",
        "model.d_model=32", "model.num_heads=2", "model.ffn_dim=64", "training.epochs=1",
        "runtime.precision=float32", "training.jit_compile=false", "training.verbose=0",
    ])
    namespace = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{name}[{i}]", "exec"), namespace)
        if i == tagged[0]:
            exec(injected, namespace)
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert os.path.isfile(tmp_path / "model.keras") and "default x1" in out
