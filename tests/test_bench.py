"""The measurement code measures what it says (figures themselves belong to `clusterattn bench`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from clusterattn import bench, bench_floor
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


class _Tokenizer:
    """What the bench needs of a tokenizer when prompt ids are given."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_selection_timing_runs():
    rows = bench.selection_timing(lengths=(512,), budgets=(128, 256), layers=2, reps=2, batch=2)
    assert [(r["length"], r["budget"], r["batch"]) for r in rows] == [(512, 128, 2), (512, 256, 2)]
    assert all(r["ratio"] > 0 and r["cpu_ratio"] > 0 for r in rows)
    table = bench.selection_markdown(rows)
    assert len(table) == 2 + len(rows) and "CPU ratio" in table[0]


def test_cases_run_with_a_fixed_mmap_threshold(monkeypatch):
    """With a threshold, each case's process gets MALLOC_MMAP_THRESHOLD_ (reproducible peak RSS);
    0, the default, leaves the environment's setting; the row says which; a bad value fails before
    any process starts."""
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout='{"peak_rss_bytes": 1}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    case = bench.Case("smollm2-135m", 512, "full", None)
    assert bench.run_isolated(case, mmap_threshold=131072)["malloc_mmap_threshold"] == "131072"
    assert seen[-1]["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert bench.run_isolated(case)["malloc_mmap_threshold"] == "glibc default"
    assert "MALLOC_MMAP_THRESHOLD_" not in seen[-1]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="mmap_threshold"):
            bench.run_isolated(case, mmap_threshold=bad)
        with pytest.raises(ValueError, match="mmap_threshold"):
            bench.run_bench(models=["smollm2-135m"], lengths=[512], presses=["full"], budgets=[64],
                            mmap_threshold=bad)  # fmt: skip
    assert len(seen) == 2


def test_peak_rss_is_measured_again_with_a_fixed_mmap_threshold(monkeypatch, tmp_path):
    """Each case runs timed under the environment's malloc, then once more (one repeat) with the
    threshold fixed; both peaks land in bench.json and the table, times only from the first."""
    calls = []

    def fake_run_isolated(case, timeout=3600, cap_bytes=None, mmap_threshold=0):
        calls.append((case.press, case.repeats, mmap_threshold))
        peak = {"full": 1000, "clusterattn": 800}[case.press] * (1 if mmap_threshold else 2) * 2**20
        row = {**bench.asdict(case), "prefill_s": 1.0 + mmap_threshold, "compress_s": 0.01,
               "compress_share": 0.01, "decode_ms_per_token": 10.0, "decode_tokens_per_s": 100.0,
               "kv_bytes": 2**20, "peak_kv_bytes": 2**20, "peak_rss_bytes": peak}  # fmt: skip
        return row | {"malloc_mmap_threshold": str(mmap_threshold) if mmap_threshold else "glibc default"}

    monkeypatch.setattr(bench, "run_isolated", fake_run_isolated)
    monkeypatch.setattr(bench, "selection_timing", lambda: [])
    report = bench.run_bench(models=["smollm2-135m"], lengths=[512], presses=["full", "clusterattn"],
                             budgets=[64], repeats=3, out_dir=tmp_path)  # fmt: skip
    assert calls == [("full", 3, 0), ("clusterattn", 3, 0), ("full", 1, 131072), ("clusterattn", 1, 131072)]
    pressed = report["cases"][1]
    assert pressed["prefill_s"] == 1.0 and pressed["peak_rss_ratio"] == 0.8
    assert pressed["peak_rss_fixed_mmap_bytes"] == 800 * 2**20 and pressed["peak_rss_fixed_mmap_ratio"] == 0.8
    table = (tmp_path / "bench.md").read_text()
    assert "peak RSS MB, fixed mmap (x full)" in table and "| 1600 (0.80) | 800 (0.80) | 1.00x |" in table
    assert "MALLOC_MMAP_THRESHOLD_=131072" in table
    older = {k: v for k, v in pressed.items() if "fixed_mmap" not in k}  # a row without the second peak
    assert "| 1600 (0.80) | - | 1.00x |" in bench.markdown([report["cases"][0], older])
    no_full = {k: v for k, v in pressed.items() if not k.endswith(("_ratio", "speedup"))}
    line = bench.markdown([no_full]).splitlines()[-1]  # a run without full: no ratio against itself
    assert "(1.00" not in line and "1.00x" not in line and line.endswith("(-) | - |")
    calls.clear()
    report = bench.run_bench(models=["smollm2-135m"], lengths=[512], presses=["full"], budgets=[64],
                             out_dir=tmp_path, rss_mmap_threshold=0)  # fmt: skip
    assert calls == [("full", 3, 0)] and "fixed mmap" not in (tmp_path / "bench.md").read_text()


def test_bad_press_name():
    with pytest.raises(ValueError, match="unknown"):
        bench.make_press("snapkw", 64)
    with pytest.raises(ValueError, match="budget"):
        bench.make_press("snapkv", None)


@pytest.mark.slow
def test_measure_and_report_on_smollm2(smollm2, tmp_path):
    full = bench.measure(bench.Case(length=256, press="full", repeats=1, new_tokens=3))
    pressed = bench.measure(bench.Case(length=256, press="clusterattn", budget=64, repeats=1, new_tokens=3))
    assert pressed["kv_bytes"] * 256 == full["kv_bytes"] * 64  # exactly budget / L of the full cache
    assert pressed["kept_tokens"] == 64 and full["kept_tokens"] == 256
    # layer-wise: the peak is the compressed layers plus one full layer, far below the full cache
    assert pressed["peak_kv_bytes"] < full["kv_bytes"] / 2
    assert pressed["compress_s"] > 0 and full["compress_s"] == 0
    rows = bench.ratio_rows([full, pressed])
    assert rows[1]["kv_ratio"] == 0.25
    assert "clusterattn" in bench.markdown(rows)
    bench.plot(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.slow
def test_throughput_batch_fits_cap(smollm2):
    cap = bench.rss_bytes() + 3 * 2**30  # room for the model it loads, and a batch
    row = bench.throughput(
        bench.Case(length=256, press="clusterattn", budget=64, new_tokens=3), cap, max_batch=4
    )
    assert 1 <= row["max_batch"] <= 4 and row["decode_tokens_per_s"] > 0


def test_case_validation():
    with pytest.raises(ValueError, match="torch dtype"):
        bench.Case(dtype="bfloat")
    with pytest.raises(ValueError, match="new_tokens"):
        bench.Case(new_tokens=1)


def test_prompt_ids_must_cover_the_length():
    with pytest.raises(ValueError, match=">= 64 token ids"):
        bench.prompt_inputs(_Tokenizer(), 64, 1, "cpu", torch.arange(32))
    inputs = bench.prompt_inputs(_Tokenizer(), 16, 3, "cpu", torch.arange(40, dtype=torch.int32))
    assert inputs.prompt_ids.shape == (3, 16) and inputs.prompt_ids.dtype == torch.long
    assert inputs.prompt_ids[2].tolist() == list(range(16))


def test_measure_and_throughput_on_a_loaded_model():
    """The device-agnostic entry points used by benchmarks/gpu_bench.py, on CPU with given ids."""
    model, ids = tiny_model("llama"), torch.randint(1, 128, (300,))
    case = bench.Case("tiny", 256, "snapkv", 64, new_tokens=3, repeats=1, threads=1)
    row = bench.measure_model(model, _Tokenizer(), case, ids)
    full = bench.measure_model(model, _Tokenizer(), bench.Case("tiny", 256, new_tokens=3, repeats=1), ids)
    assert row["kv_bytes"] * 256 == full["kv_bytes"] * 64 and row["kept_tokens"] == 64
    assert row["peak_device_bytes"] == 0 and row["device"] == "cpu"  # device memory: CUDA only
    # layer-wise compression: one full layer at a time (2 layers here), below the full cache
    assert row["peak_kv_bytes"] < full["kv_bytes"]
    cap = bench.rss_bytes() + 2**30
    tp = bench.throughput_model(model, _Tokenizer(), case, cap, max_batch=3, ids=ids)
    assert tp["max_batch"] == 3 and tp["decode_tokens_per_s"] > 0 and tp["sequence_kv_bytes"] > 0


def test_gpu_bench_report_regenerates_from_its_json():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    report = json.loads((ROOT / "docs" / "bench-gpu" / "gpu_bench.json").read_text())
    table = gpu_bench.markdown(report)
    assert "| llama-3.1-8b | 131072 | eager | clusterattn | 1024 |" in table
    assert "Not measured" not in table  # every case of the recorded run succeeded


def test_compiled_decode_chunked_prefill_and_the_floor_in_one_run():
    """The compiled decode path and the chunked prefill are cases like the others: the same kept
    tokens, ratios against the full cache of the same path, and a bandwidth floor beside each
    decode time (weights + the cache a step reads, over the copy bandwidth measured in the run)."""
    model, ids = tiny_model("llama"), torch.randint(1, 128, (300,))
    common = dict(new_tokens=3, repeats=1, threads=1)
    rows = [
        bench.measure_model(
            model, _Tokenizer(), bench.Case("tiny", 256, press, budget, **common, **extra), ids
        )
        for extra in ({}, {"compile": "eager", "prefill_chunk": 50})
        for press, budget in (("full", None), ("snapkv", 64))
    ]
    eager_full, eager_snap, compiled_full, compiled_snap = bench.ratio_rows(rows)
    assert compiled_snap["kept_tokens"] == eager_snap["kept_tokens"] == 64
    assert compiled_snap["kv_bytes"] == eager_snap["kv_bytes"]  # the prompt's part of the static cache
    assert compiled_snap["kv_ratio"] == eager_snap["kv_ratio"] == 0.25  # each against its own path
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    assert rows[0]["weight_bytes"] == params - embedding.numel() * embedding.element_size()
    for row in rows:
        assert row["copy_bandwidth"] > 0 and row["decode_vs_floor"] > 0
        expected = 1000 * (row["weight_bytes"] + row["step_cache_bytes"]) / row["copy_bandwidth"]
        assert row["floor_ms_per_token"] == pytest.approx(expected)
    table = bench.markdown([eager_full, eager_snap, compiled_full, compiled_snap])
    assert "| compiled (eager), prefill chunk 50 | snapkv |" in table and "| eager | snapkv |" in table
    assert f"({compiled_snap['decode_vs_floor']:.2f}x)" in table
    for row in rows:  # the GEMV bound: the weights' matrix-vector products alone, timed in the run
        assert row["matvec_ms_per_token"] > 0
        assert row["decode_vs_matvec"] == pytest.approx(
            row["decode_ms_per_token"] / row["matvec_ms_per_token"]
        )
    assert "| matvec ms/tok (x matvec) |" in table
    assert (
        f"| {compiled_snap['matvec_ms_per_token']:.1f} ({compiled_snap['decode_vs_matvec']:.2f}x) |" in table
    )
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())
    with pytest.raises(ValueError, match="no nn.Linear"):
        bench_floor.matvec_ms(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(ValueError, match="compile"):
        bench.Case(compile="tensorrt")
    with pytest.raises(ValueError, match="prefill_chunk"):
        bench.Case(prefill_chunk=0)


def test_a_long_generation_with_and_without_a_decode_budget():
    """A decode budget bounds the cache of a long generation; the full cache row stays one."""
    model, ids = tiny_model("llama"), torch.randint(1, 128, (300,))
    common = dict(new_tokens=60, repeats=1, threads=1)
    plain = bench.measure_model(model, _Tokenizer(), bench.Case("tiny", 256, "snapkv", 64, **common), ids)
    bounded = bench.measure_model(
        model,
        _Tokenizer(),
        bench.Case("tiny", 256, "snapkv", 64, decode_budget=40, interval=8, **common),
        ids,
    )
    per_token = plain["kv_bytes"] // 64
    assert plain["final_kv_bytes"] == (64 + 59) * per_token and plain["decode_compressions"] == 0
    assert bounded["final_kv_bytes"] < (40 + 8) * per_token and bounded["decode_compressions"] > 0
    assert "decode budget 40 / 8" in bench.markdown([bounded])
    with pytest.raises(ValueError, match="full cache"):
        bench.Case(press="full", decode_budget=40)
    with pytest.raises(ValueError, match="static cache"):
        bench.Case(press="snapkv", budget=64, decode_budget=40, compile="eager")
