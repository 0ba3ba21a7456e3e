"""Press specifications, budgets, metrics aggregation and the report, without a model."""

from __future__ import annotations

import csv
import json
import math

import pytest

from clusterattn.eval.compare import depth_tables, head_to_head
from clusterattn.eval.report import aggregate, average_tables, latest_rows, write_report
from clusterattn.eval.spec import budget_label, parse_budget, parse_press, validate
from clusterattn.presses import ClusterAttnPress, SnapKVPress


def test_parse_press_with_parameters():
    spec = parse_press("clusterattn:num_block=16,span_before=0.25,aggregation=mean")
    assert spec.params == {"num_block": 16, "span_before": 0.25, "aggregation": "mean"}
    press = spec.build(256)
    assert isinstance(press, ClusterAttnPress)
    assert (press.budget, press.num_block, press.span_before, press.aggregation) == (256, 16, 0.25, "mean")
    assert spec.label == "clusterattn:aggregation=mean,num_block=16,span_before=0.25"
    assert isinstance(parse_press("SnapKV").build(0.5), SnapKVPress)
    assert parse_press("snapkv").build(0.5).compression_ratio == 0.5
    assert parse_press("full").build(None) is None


def test_parse_peer_press():
    spec = parse_press("kvpress:chunkkv:window_size=32,chunk_length=32")
    assert spec.is_peer and spec.label == "kvpress:chunkkv:chunk_length=32,window_size=32"
    with pytest.raises(ValueError, match="peers environment"):
        spec.build(128)


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "unknown clusterattn press"),
        ("kvpress:nope", "unknown kvpress press"),
        ("clusterattn:num_block", "not field=value"),
        ("clusterattn:num_block=3,num_block=4", "given twice"),
        ("clusterattn:budget=3", "with --budgets"),
        ("a:b:c:d", "expected name"),
        ("", "empty"),
    ],
)
def test_parse_press_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_press(text)


def test_validate_builds_every_budget_before_loading():
    with pytest.raises(ValueError, match="accepts"):
        validate([parse_press("clusterattn:num_blok=3")], [128])
    with pytest.raises(ValueError, match="alpha must be finite"):
        validate([parse_press("clusterattn:alpha=nan")], [128])
    with pytest.raises(ValueError, match="chunk_size"):
        validate([parse_press("h2o:chunk_size=0")], [128])
    with pytest.raises(ValueError, match="budget"):
        validate([parse_press("clusterattn")], [8])  # below the 32-token window
    validate([parse_press("full"), parse_press("kvpress:snapkv")], [128])


def test_budgets():
    assert parse_budget("128") == 128 and parse_budget("0.25") == 0.25
    for bad in ("0", "1.5", "x", True):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert (budget_label(None), budget_label(64), budget_label(0.5)) == ("full", "64", "r0.5")


def _row(press, budget, task, index, score, error=None, depth=None, length=2048):
    return {
        "model": "m", "task": task, "length": length, "setting": "query_aware", "press": press,
        "budget": budget, "index": index, "score": score, "error": error, "depth": depth,
    }  # fmt: skip


def test_aggregate_means_failures_and_retries():
    rows = [
        _row("ca", "64", "t", 0, 1.0),
        _row("ca", "64", "t", 1, None, error="boom"),
        _row("ca", "64", "t", 2, 0.5),
        _row("ca", "64", "t", 1, 0.0),  # a retry replaces the failure
        _row("full", "full", "t", 0, 1.0),
    ]
    cells = {(c["press"], c["budget"]): c for c in aggregate(rows)}
    assert cells[("ca", "64")]["n"] == 3 and cells[("ca", "64")]["failed"] == 0
    assert cells[("ca", "64")]["score"] == pytest.approx(50.0)
    rows.append(_row("ca", "64", "t", 3, None, error="boom"))
    cell = {(c["press"], c["budget"]): c for c in aggregate(rows)}[("ca", "64")]
    assert (cell["n"], cell["failed"]) == (3, 1)


def test_average_table_marks_best():
    rows = [_row(p, b, t, 0, s) for p, b, t, s in [
        ("ca", "64", "a", 1.0), ("ca", "64", "b", 0.0), ("snap", "64", "a", 0.0), ("snap", "64", "b", 0.0),
        ("full", "full", "a", 1.0), ("full", "full", "b", 1.0),
    ]]  # fmt: skip
    metrics = aggregate(rows)
    for m in metrics:
        m["score"] = float(m["score"])
    table = average_tables(metrics)
    assert "| ca | **50.0** |" in table and "| snap | 0.0 |" in table and "full cache: 100.0" in table


def test_write_report_files_and_doc_splice(tmp_path):
    rows = []
    for i, depth in enumerate([0.1, 0.5, 0.9]):
        for press, budget, score in [
            ("clusterattn", "64", 1.0),
            ("snapkv", "64", 0.0),
            ("full", "full", 1.0),
        ]:
            rows.append(_row(press, budget, "niah_single_1", i, score, depth=depth))
            rows.append(_row(press, budget, "vt", i, score / 2))
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    paths = write_report(tmp_path, doc=doc)
    assert all(p.exists() for p in paths)
    with (tmp_path / "metrics.csv").open() as handle:
        metrics = list(csv.DictReader(handle))
    assert list(metrics[0]) == [
        "model",
        "task",
        "length",
        "press",
        "budget",
        "setting",
        "n",
        "failed",
        "score",
    ]
    assert any(p.name.startswith("needle_heatmap") for p in paths)
    assert any(p.name.startswith("score_vs_budget") for p in paths)
    assert not any(p.name == "leaderboard.png" for p in paths)  # token budgets only: no ratio axis
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and text.count(f"<!-- eval {tmp_path.name} begin -->") == 1
    write_report(tmp_path, doc=doc)  # idempotent: the section is replaced, not appended
    assert doc.read_text().count(f"<!-- eval {tmp_path.name} begin -->") == 1
    assert not math.isnan(float(metrics[0]["score"]))


def _metric(press, budget, task, score, setting="query_aware"):
    return {"model": "m", "task": task, "length": 2048, "press": press, "budget": budget,
            "setting": setting, "n": 1, "failed": 0, "score": score}  # fmt: skip


def test_head_to_head_verdicts_and_task_wins():
    metrics = [_metric(p, b, t, s) for p, b, t, s in [
        ("clusterattn", "64", "a", 60.0), ("clusterattn", "64", "b", 20.0),  # 40 vs 30: best
        ("snapkv", "64", "a", 50.0), ("snapkv", "64", "b", 10.0),
        ("clusterattn", "128", "a", 40.0), ("clusterattn", "128", "b", 38.0),  # 39 vs 41: within 3
        ("snapkv", "128", "a", 42.0), ("snapkv", "128", "b", 40.0),
        ("streamingllm", "128", "a", 10.0),  # missing task b: left out of the comparison
        ("clusterattn", "256", "a", 10.0), ("clusterattn", "256", "b", 30.0),  # 20 vs 30: behind
        ("snapkv", "256", "a", 30.0), ("snapkv", "256", "b", 30.0),
        ("clusterattn", "512", "a", 0.0), ("clusterattn", "512", "b", 5.0),  # a: all 0, left out
        ("snapkv", "512", "a", 0.0), ("snapkv", "512", "b", 0.0),
        ("full", "full", "a", 100.0), ("full", "full", "b", 100.0),
    ]]  # fmt: skip
    table = head_to_head(metrics)
    assert "| 512 | 2.5 | snapkv 0.0 | +2.5 | best | 1 of 1 |" in table
    assert "| 64 | 40.0 | snapkv 30.0 | +10.0 | best | 2 of 2 |" in table
    assert "| 128 | 39.0 | snapkv 41.0 | -2.0 | within 3 | 0 of 2 |" in table
    assert "| 256 | 20.0 | snapkv 30.0 | -10.0 | behind | 1 of 2 |" in table  # a tie counts as best
    assert "streamingllm" not in table and "full" not in table.split("\n", 1)[1]
    assert head_to_head(metrics, press="nope") == ""
    # another configuration of the same press is not a rival, in either direction
    variant = [_metric("clusterattn:recent_ratio=0.5", "64", t, 90.0) for t in "ab"]
    assert "| 64 | 40.0 | snapkv 30.0 | +10.0 | best | 2 of 2 |" in head_to_head(metrics + variant)
    table = head_to_head(metrics + variant, press="clusterattn:recent_ratio=0.5")
    assert "| 64 | 90.0 | snapkv 30.0 | +60.0 | best | 2 of 2 |" in table


def test_depth_tables_split_needles_by_quarter():
    needles = [(0.1, 0.0), (0.2, 1.0), (0.6, 1.0), (0.99, 1.0), (1.0, 0.0)]  # (depth, score)
    rows = [_row("clusterattn", "64", "niah_single_1", i, s, depth=d) for i, (d, s) in enumerate(needles)]
    rows += [_row("full", "full", "niah_single_1", i, 1.0, depth=r["depth"]) for i, r in enumerate(rows)]
    rows.append(_row("clusterattn", "64", "vt", 0, 1.0))  # no depth: ignored
    rows.append(_row("clusterattn", "64", "niah_single_1", 9, None, error="boom", depth=0.3))
    table = depth_tables(rows)
    assert "0-25 % (n=2) | 25-50 % (n=0) | 50-75 % (n=1) | 75-100 % (n=2)" in table
    assert "| full | 100.0 | - | 100.0 | 100.0 |" in table
    assert "| clusterattn | 50.0 | - | 100.0 | 50.0 |" in table
    assert "B=full" not in table


def test_report_counts_only_the_latest_row_of_a_rerun_sample(tmp_path, monkeypatch):
    from clusterattn.eval import report

    rows = [_row("clusterattn", "64", "niah_single_1", 0, 0.0, depth=0.5),
            _row("full", "full", "niah_single_1", 0, 1.0, depth=0.5),
            _row("clusterattn", "64", "niah_single_1", 0, 1.0, depth=0.5)]  # fmt: skip
    latest = latest_rows(rows)
    assert len(latest) == 2 and rows[0] not in latest and rows[2] in latest
    seen = []
    monkeypatch.setattr(report, "needle_heatmaps", lambda rows, out: seen.extend(rows) or [])
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    assert len(seen) == 2 and rows[0] not in seen
    assert "| clusterattn | - | - | 100.0 | - |" in (tmp_path / "tables.md").read_text()


def test_plot_styles_tell_every_press_apart():
    from clusterattn.eval.plots import _styles

    presses = ["chunkkv", "clusterattn", "clusterattn:recent_ratio=0.75", "clusterattn:recent_ratio=0.875"]
    presses += ["h2o", "kvpress:snapkv", "pyramidkv", "snapkv", "streamingllm"]
    styles = _styles(presses)
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(looks) == len(presses)  # no two lines drawn alike
    reds = {"tab:red", "darkred", "lightcoral", "maroon"}
    assert {p for p, s in styles.items() if s["color"] in reds} == {p for p in presses if "clusterattn" in p}
    assert styles["kvpress:snapkv"]["linestyle"] == "--"
    # a leaderboard with kvpress's presses beside ours: more lines than shades or colours
    many = [f"clusterattn:window_size={8 + i}" for i in range(9)] + [f"kvpress:p{i}" for i in range(14)]
    many += ["snapkv", "chunkkv", "streamingllm"]
    styles = _styles(many)
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}) == len(many)


def test_long_press_labels_wrap_after_commas():
    from clusterattn.eval.plots import _wrapped

    spec = "clusterattn:max_clusters=None,n_sink=4,scorer=leverage,span_before=0.5,span_width=24,"
    spec += "unrotate_keys=True"
    lines = _wrapped(spec).split("\n")
    assert len(lines) == 3 and all(len(line) <= 45 for line in lines)
    assert "".join(line.strip() for line in lines) == spec
    assert _wrapped("snapkv") == "snapkv"


def test_leaderboard_plots_ratio_budgets_against_the_compression_factor(tmp_path, monkeypatch):
    """``leaderboard.png``: one panel per run with ratio budgets, x = 1 / (1 - ratio), y = the score
    averaged over the run's tasks (percent), one line per press."""
    import matplotlib.axes

    rows = [_row("full", "full", task, 0, 1.0) for task in ("vt", "cwe")]
    for press, budget, vt, cwe in [("clusterattn", "r0.5", 1.0, 0.8), ("clusterattn", "r0.875", 0.5, 0.5),
                                   ("snapkv", "r0.5", 0.8, 0.8), ("snapkv", "r0.875", 0.3, 0.1),
                                   ("snapkv", "64", 0.0, 0.0)]:  # fmt: skip
        rows += [_row(press, budget, "vt", 0, vt), _row(press, budget, "cwe", 0, cwe)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = {}
    real = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, label=None, **kwargs):
        lines.setdefault(label, (list(x), [round(v, 6) for v in y]))  # the leaderboard draws first
        return real(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    paths = write_report(tmp_path)
    assert (tmp_path / "leaderboard.png") in paths and (tmp_path / "leaderboard.png").stat().st_size > 0
    assert lines["clusterattn"] == ([2.0, 8.0], [90.0, 50.0])
    assert lines["snapkv"] == ([2.0, 8.0], [80.0, 20.0])  # the token budget 64 is not on this axis


def test_leaderboard_of_many_presses_puts_the_legend_beside_the_panel(tmp_path, monkeypatch):
    """Past 8 presses the legend sits outside the axes (right of them), where it covers no line."""
    import matplotlib.axes

    rows = [_row("full", "full", "vt", 0, 1.0)]
    rows += [_row(f"clusterattn:window_size={8 + i}", "r0.875", "vt", 0, i / 10) for i in range(9)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    anchors = []
    real = matplotlib.axes.Axes.legend

    def legend(self, *args, **kwargs):
        anchors.append(kwargs.get("bbox_to_anchor"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    write_report(tmp_path)
    assert anchors[0] is not None and anchors[0][0] > 1.0


def test_report_of_a_partial_run_draws_its_figures(tmp_path):
    """A run stopped part way (presses scored on some tasks only: every average over the run's
    tasks is NaN, and a task panel may hold no press at all) still gets its figures."""
    rows = [_row("full", "full", task, 0, 1.0) for task in ("vt", "cwe")]
    rows += [_row("snapkv", budget, "vt", 0, 0.5) for budget in ("r0.875", "r0.9375", "64", "128")]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = {p.name for p in write_report(tmp_path)}
    assert "leaderboard.png" in names
    assert any(name.startswith("score_vs_budget") for name in names)


def test_report_of_ratio_budgets_alone_draws_the_leaderboard_and_no_score_vs_budget(tmp_path):
    """A run without token budgets has no score-vs-budget axis (it used to fail on an empty log axis)."""
    rows = [_row("full", "full", "vt", 0, 1.0), _row("snapkv", "r0.875", "vt", 0, 0.0)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = {p.name for p in write_report(tmp_path)}
    assert "leaderboard.png" in names
    assert not any(name.startswith("score_vs_budget") for name in names)
