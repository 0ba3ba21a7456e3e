"""The measurement code measures what it says (figures themselves belong to `clusterattn bench`)."""

from __future__ import annotations

import pytest

from clusterattn import bench


def test_selection_timing_runs():
    rows = bench.selection_timing(lengths=(512,), budgets=(128, 256), layers=2, reps=2, batch=2)
    assert [(r["length"], r["budget"], r["batch"]) for r in rows] == [(512, 128, 2), (512, 256, 2)]
    assert all(r["ratio"] > 0 and r["cpu_ratio"] > 0 for r in rows)
    table = bench.selection_markdown(rows)
    assert len(table) == 2 + len(rows) and "CPU ratio" in table[0]


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
    rows = bench._ratio_rows([full, pressed])
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
