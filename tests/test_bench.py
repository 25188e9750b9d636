"""`tf-effitrain bench`: the report is complete and consistent (no speed claims here)."""

from tf_effitrain.bench._measure import measure_in_child
from tf_effitrain.config import ModelConfig

TINY = ModelConfig(num_layers=1, d_model=16, num_heads=2, ffn_dim=32, dropout=0.0)


def test_memory_falls_back_to_rss_without_allocator_statistics(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "false")
    row = measure_in_child(model_cfg=TINY, vocab_size=60, max_length=16, batch=4, k=1,
                           steps=1)
    assert row["memory_source"] == "rss"
    assert row["step_peak_mb"] == row["rss_growth_mb"] >= 0


