"""Every `tf-effitrain bench` suite's `--quick` run: its three files and their schema.

The figures of a quick run are not claims (tiny models, few steps); these tests check
that each suite runs end to end from the command line and writes a complete, consistent
result.json, result.md and result.png into its own directory. (`bench inference` is
checked in detail in test_bench_inference.py, through the same `run_bench`.)
"""

import json
import math
import os

import matplotlib.image
import pytest

from tf_effitrain.bench._measure import cpu_name
from tf_effitrain.bench.suite import SUITES
from tf_effitrain.cli import main

from harness import FORTUNES

# suite -> keys its result must hold (besides the common ones).
KEYS = {
    "recipe": {"rows", "summary", "seeds", "model", "epochs"},
    "mfu": {"rows", "peak_gflops", "peak_measurements", "profile"},
    "data": {"rows", "learners", "sizes", "steps", "modes"},
    "accumulation": {"rows", "ratios", "k"},
    "precision": {"rows", "speedup", "auto", "reference"},
    "distill": {"accuracy", "summary", "models", "distilled_over_teacher"},
    "compress": {"rows", "summary", "base_accuracy"},
    "pruning": {"rows", "summary", "base_accuracy", "float32_tflite"},
}
COMMON = {"suite", "command", "date", "seconds", "cpu", "quick"}


def _finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_specific(what, result):
    if what == "recipe":
        roles = sorted(r["role"] for r in result["rows"])
        assert roles == ["baseline", "recipe"]
        for r in result["rows"]:
            assert _finite_positive(r["real_tokens_per_s"]) and 0 <= r["val_accuracy"] <= 1
            assert 0 <= r["padding_fraction"] < 1
            assert r["real_tokens_per_epoch"] > 0 and r["timed_epochs"] == 1
        recipe = next(r for r in result["rows"] if r["role"] == "recipe")
        baseline = next(r for r in result["rows"] if r["role"] == "baseline")
        assert recipe["same_vocabulary"] is True
        # Same examples, same truncation: the same real tokens per epoch.
        assert recipe["real_tokens_per_epoch"] == baseline["real_tokens_per_epoch"]
        speed = result["summary"]["speedup"]
        assert speed["mean"] == pytest.approx(
            recipe["real_tokens_per_s"] / baseline["real_tokens_per_s"])
    elif what == "mfu":
        assert set(result["peak_gflops"]) == {"float32", "bfloat16"}
        for r in result["rows"]:
            assert _finite_positive(r["gflops_per_s"]) and r["flops_per_step"] > 0
            assert r["mfu_vs_bf16_peak"] == pytest.approx(
                r["gflops_per_s"] / result["peak_gflops"]["bfloat16"])
        ops = result["profile"]["ops"]
        assert ops and sum(o["share"] for o in ops) == pytest.approx(1.0)
        assert any("MatMul" in o["op"] for o in ops)
        assert not any(o["op"] == "Process" for o in ops)  # executor spans left out
    elif what == "data":
        from tf_effitrain.bench.data import QUICK_SIZES

        assert [r["examples"] for r in result["rows"]] == list(QUICK_SIZES)
        assert {r["mode"] for r in result["rows"]} == {"stream"}
        for r in result["rows"]:
            assert sum(r["split_sizes"].values()) == r["examples"]
            for key in ("first_step_s", "rss_first_step_mib", "rss_peak_mib",
                        "input_tokens_per_s", "input_examples_per_s", "train_tokens_per_s"):
                assert _finite_positive(r[key]), key
            assert r["rss_peak_mib"] >= r["rss_first_step_mib"]
        learned = {r["learner"]: r for r in result["learners"]}
        assert set(learned) == {"tokenizers", "keras_hub"}
        assert learned["tokenizers"]["tokens"] == learned["tokenizers"]["requested"]
    elif what in ("accumulation", "precision"):
        assert all(_finite_positive(r["examples_per_s"]) for r in result["rows"])
        if what == "accumulation":  # run without oneDNN (below): the AVX2 machine's path
            rows = result["rows"]
            assert [(r["micro_batch"], r["accumulation_steps"]) for r in rows] == [
                (4, 1), (4, 3), (12, 1)]
            assert {r["memory_source"] for r in rows} == {"allocator"}
            assert result["ratios"]["throughput_k_vs_k1"] == pytest.approx(
                rows[1]["examples_per_s"] / rows[0]["examples_per_s"])
    elif what == "distill":
        for role in ("teacher", "distilled", "scratch"):
            assert len(result["accuracy"][role]) == 1
    else:  # compress, pruning: one level, one seed
        (level, rows), = result["rows"].items()
        assert len(rows) == 1 and 0 <= rows[0]["accuracy"] <= 1, level


@pytest.mark.parametrize("what", sorted(KEYS))
def test_quick_suite_writes_json_markdown_and_png(what, tmp_path, capsys, monkeypatch):
    assert set(KEYS) | {"inference"} == set(SUITES)
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if what == "accumulation":
        # TF_ENABLE_ONEDNN_OPTS=0 imitates an AVX2-only CPU, where TensorFlow keeps no
        # allocator statistics by default: the suite still measures allocator memory.
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
        monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    out = tmp_path / what
    argv = ["bench", what, "--quick", "--out-dir", str(out), "--set", f"data.path={FORTUNES}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert COMMON | KEYS[what] <= set(result), set(result)
    assert result["suite"] == what and result["quick"] is True
    assert result["command"] == "tf-effitrain " + " ".join(argv)
    assert result["cpu"] == cpu_name() and result["seconds"] > 0
    _check_specific(what, result)
    markdown = (out / "result.md").read_text()
    assert markdown.startswith(f"# tf-effitrain bench {what}\n")
    assert f"`{result['command']}`" in markdown and "![plot](result.png)" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) >= 3 and table[1].startswith("|---")
    assert table[0] in printed and "written:" in printed
    image = matplotlib.image.imread(str(out / "result.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
