"""`tf-effitrain bench`: the report is complete and consistent (no speed claims here)."""

import json

from tf_effitrain.bench import bench_precision, format_accumulation, format_precision
from tf_effitrain.bench._measure import measure_in_child
from tf_effitrain.cli import main
from tf_effitrain.config import ModelConfig

TINY = ModelConfig(num_layers=1, d_model=16, num_heads=2, ffn_dim=32, dropout=0.0)


def test_cli_bench_accumulation_on_a_cpu_without_onednn(tmp_path, capsys, monkeypatch):
    """`TF_ENABLE_ONEDNN_OPTS=0` imitates an AVX2-only CPU, where TensorFlow keeps no CPU
    allocator statistics by default: the bench still measures allocator memory."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.delenv("TF_CPU_ALLOCATOR_USE_BFC", raising=False)
    out = tmp_path / "bench.json"
    assert main(["bench", "accumulation", "--set", "model.num_layers=1",
                 "--set", "model.d_model=16", "--set", "model.num_heads=2",
                 "--set", "model.ffn_dim=32", "--set", "data.max_length=16",
                 "--micro-batch", "4", "-k", "3", "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step memory" in printed and "CPU: " in printed
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["micro_batch"], r["accumulation_steps"]) for r in rows] == [(4, 1), (4, 3), (12, 1)]
    assert [r["effective_batch"] for r in rows] == [4, 12, 12]
    assert {r["memory_source"] for r in rows} == {"allocator"}
    # A tiny model may fit in the allocator's first region: memory can read 0.
    assert all(r["step_peak_mb"] >= 0 and r["examples_per_s"] > 0 for r in rows)
    ratios = result["ratios"]
    assert ratios["throughput_k_vs_k1"] == rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    table = format_accumulation(result)
    assert table.count("\n| ") == 3 and "k=3 vs k=1" in table  # three data rows


def test_memory_falls_back_to_rss_without_allocator_statistics(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "false")
    row = measure_in_child(model_cfg=TINY, vocab_size=60, max_length=16, batch=4, k=1,
                           steps=1)
    assert row["memory_source"] == "rss"
    assert row["step_peak_mb"] == row["rss_growth_mb"] >= 0


def test_bench_precision_reports_each_policy_against_the_first():
    result = bench_precision(TINY, vocab_size=60, max_length=16, batch=4, steps=1,
                             policies=("float32", "mixed_bfloat16"), log=None)
    assert [r["precision"] for r in result["rows"]] == ["float32", "mixed_bfloat16"]
    assert result["speedup"]["float32"] == 1.0
    assert result["speedup"]["mixed_bfloat16"] > 0
    assert result["auto"][0] in ("float32", "mixed_bfloat16", "mixed_float16")
    table = format_precision(result)
    assert "| mixed_bfloat16 |" in table and "`precision: auto` picks" in table
    assert f"CPU: {result['cpu']}" in table
