"""`bench inference`: one quick suite run on a tiny config, its rows, table and plot."""

import argparse
import json

import keras
import numpy as np
import pytest

from harness import TINY
from tf_effitrain.bench import inference
from tf_effitrain.bench._measure import cpu_name
from tf_effitrain.bench.suite import run_bench
from tf_effitrain.export.tflite import ExportError


def _quick(out):
    """One `--quick` run through the suite runner, started under a non-default policy
    to check the suite restores the caller's."""
    args = argparse.Namespace(quick=True, config=None, overrides=TINY, out_dir=str(out),
                              steps=None, rounds=None, threads=None)
    lines = []
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        result, paths = run_bench("inference", args, argv=["bench", "inference", "--quick"],
                                  log=lines.append)
        after = keras.mixed_precision.global_policy().name
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"result": result, "lines": lines, "policy_after": after, "paths": paths}


def test_quick_suite_rows_files_table_and_plot(tmp_path):
    """One `--quick` run (the slow part: one run, several checks, so that parallel test
    workers do not each repeat it)."""
    quick = _quick(tmp_path / "inference")
    for check in (_check_every_variant_and_batch_has_a_latency_or_an_error,
                  _check_ratios_are_the_p50s_over_keras_float32_at_the_same_batch,
                  _check_variants_compute_the_same_function,
                  _check_batch_32_tflite_rows_say_which_file_they_timed,
                  _check_result_is_json_and_the_policy_is_restored,
                  _check_markdown_has_the_table):
        check(quick)
    _check_plot_is_a_png(quick, tmp_path)


def _cells(result):
    return {(r["variant"], r["batch"]): r for r in result["rows"]}


def _check_every_variant_and_batch_has_a_latency_or_an_error(quick):
    result = quick["result"]
    cells = _cells(result)
    assert len(cells) == len(result["rows"])  # one row per cell
    assert set(cells) == {(v, b) for v in inference.VARIANTS for b in (1, 32)}
    for row in result["rows"]:
        if row["error"] is None:
            assert row["p50_ms"] > 0 and row["p90_ms"] >= row["p50_ms"], row
            assert row["ms_per_example"] == pytest.approx(row["p50_ms"] / row["batch"])
        else:
            assert isinstance(row["error"], str) and row["error"], row
            assert row["p50_ms"] is None and row["ratio_p50"] is None
    # On this tiny model nothing should fail: every cell is measured.
    assert all(r["error"] is None for r in result["rows"]), result["rows"]
    assert result["quick"] is True and result["sequence_length"] == 32
    assert result["threads"] == 1  # `export.threads`, as `tf-effitrain export` verifies


def _check_ratios_are_the_p50s_over_keras_float32_at_the_same_batch(quick):
    cells = _cells(quick["result"])
    for (variant, batch), row in cells.items():
        ref = cells[inference.REFERENCE, batch]
        assert row["ratio_p50"] == pytest.approx(row["p50_ms"] / ref["p50_ms"])
        assert row["ratio_p90"] == pytest.approx(row["p90_ms"] / ref["p90_ms"])
    assert cells[inference.REFERENCE, 1]["ratio_p50"] == 1.0


def _check_variants_compute_the_same_function(quick):
    cells = _cells(quick["result"])
    assert cells["keras float32", 1]["max_logit_diff"] == 0.0
    assert cells["tflite float32", 1]["max_logit_diff"] < 1e-4
    assert cells["tflite float32", 32]["max_logit_diff"] < 1e-4
    for row in cells.values():  # bf16 and int8 round, but stay close on random weights
        assert row["max_logit_diff"] < 0.5, row


def _check_batch_32_tflite_rows_say_which_file_they_timed(quick):
    for row in quick["result"]["rows"]:
        if row["variant"].startswith("tflite"):
            assert row["size_bytes"] > 0
            if row["batch"] == 1:
                assert row["source"] == "batch-1 file"
            elif row["source"] == "batch-32 file":
                # The batch-1 file's folded reshapes refused the resize: kept as a note.
                assert isinstance(row["resize_error"], str) and row["resize_error"]
            else:
                assert row["source"] == "batch-1 file resized"


def _check_result_is_json_and_the_policy_is_restored(quick):
    result = quick["result"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    with open(quick["paths"]["json"], encoding="utf-8") as f:
        assert json.load(f) == result
    with open(quick["paths"]["md"], encoding="utf-8") as f:
        assert inference.format_result(result) in f.read()
    assert result["command"] == "tf-effitrain bench inference --quick"
    assert quick["policy_after"] == "mixed_float16"
    assert any("round 2/2" in line for line in quick["lines"])


def _check_markdown_has_the_table(quick):
    result = quick["result"]
    text = inference.format_result(result)
    lines = text.splitlines()
    assert lines[0].startswith("| variant | batch | p50 (ms) | p90 (ms) |")
    assert lines[1].startswith("|---|")
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert len(body) == len(result["rows"]) == 12
    assert "| tflite int8 | 32 |" in text and "**1.00x**" in text
    assert cpu_name() in text and "32 per row" in text


def test_markdown_of_a_failed_cell_keeps_the_error():
    result = {
        "reference": "keras float32", "model": {"num_layers": 1, "d_model": 32,
                                                 "num_heads": 2, "ffn_dim": 64},
        "vocab_size": 300, "params": 10, "sequence_length": 32, "rounds": 1, "steps": 1,
        "threads": 1, "keras_threads": 2, "cpu": "test CPU", "batch_sizes": [1],
        "rows": [{"variant": "tflite int8", "batch": 1, "source": "batch-1 file",
                  "size_bytes": None, "resize_error": None, "error": "ExportError: boom",
                  "p50_ms": None, "p90_ms": None, "ms_per_example": None,
                  "ratio_p50": None, "ratio_p90": None, "max_logit_diff": None}]}
    text = inference.format_result(result)
    assert "| tflite int8 | 1 | failed (note 1) |" in text
    assert "Note 1: tflite int8, batch 1: ExportError: boom" in text


def _check_plot_is_a_png(quick, tmp_path):
    import matplotlib.image

    path = inference.plot_result(quick["result"], str(tmp_path / "inference.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200


def test_conversion_and_run_failures_are_recorded_not_raised(monkeypatch, tmp_path):
    calls = []

    def convert(saved_model_dir, quantization, rows, batch):
        calls.append(batch)
        if batch == 1:
            return b"not a flatbuffer"  # converts, then fails to load
        raise ExportError("TFLite int8 conversion failed: boom")

    monkeypatch.setattr(inference, "_convert", convert)
    rows = np.ones((4, 8), np.int32)
    entries = inference._prepare_tflite(None, "int8", rows, 8, (1, 32), 1, str(tmp_path),
                                        {1: "b1", 32: "b32"}, log=None)
    assert calls == [1, 32]
    assert "call" not in entries[1] and entries[1]["error"]
    assert entries[32]["resize_error"]  # the batch-1 bytes could not be resized
    assert entries[32]["error"] == "ExportError: TFLite int8 conversion failed: boom"


def test_unknown_variants_are_refused():
    with pytest.raises(ValueError, match="Unknown variants"):
        inference.bench_inference(None, variants=["tflite int4"])

