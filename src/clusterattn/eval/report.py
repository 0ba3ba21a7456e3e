"""Markdown tables and figures from ``predictions.jsonl`` (see :mod:`clusterattn.eval.runner`).

``write_report(out)`` rebuilds ``metrics.csv``, ``tables.md``, ``leaderboard.png``,
``score_vs_budget_*.png`` and ``needle_heatmap_*.png`` from the predictions alone, and can splice
the headline tables into a Markdown document between ``<!-- eval NAME begin -->`` and ``<!-- eval
NAME end -->`` (``NAME``: the output folder's name, so several runs share one document).
"""

from __future__ import annotations

import math
from pathlib import Path

from clusterattn.eval.compare import depth_tables, head_to_head, method_of
from clusterattn.eval.metrics import (  # noqa: F401 (aggregate and latest_rows are re-exported)
    _complete_mean,
    _fmt,
    _mean,
    _nan_low,
    aggregate,
    budget_sort_key,
    latest_rows,
    press_order,
    read_metrics,
    runs,
    task_averages,
    write_metrics,
)
from clusterattn.eval.plots import leaderboard, needle_heatmaps, score_vs_budget
from clusterattn.eval.predictions import read_predictions


def average_tables(metrics: list[dict]) -> str:
    """Per (model, length, setting): presses x budgets, score averaged over tasks (every cell
    averages the same task set; a press missing a task shows '-')."""
    parts = []
    for (model, length, setting), rows in runs(metrics):
        tasks, budgets, by, average = task_averages(rows)
        full = [
            by.get((p, "full", t)) for p in {r["press"] for r in rows if r["budget"] == "full"} for t in tasks
        ]
        presses = sorted({p for p, _ in average}, key=press_order)
        counts = [r["n"] for r in rows]
        n = f"{min(counts)}-{max(counts)}" if min(counts) != max(counts) else str(max(counts))
        lines = [
            f"**{model}, {length} tokens, {setting.replace('_', '-')}** ({len(tasks)} tasks, "
            f"{n} samples per cell; full cache: {_fmt(_mean(full))})",
            "",
            f"Tasks: {', '.join(tasks)}.",
            "",
            "| press | " + " | ".join(f"B={b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        best = {b: max((average[p, b] for p in presses), key=_nan_low) for b in budgets}
        for press in presses:
            cells = []
            for b in budgets:
                value, text = average[press, b], _fmt(average[press, b])
                cells.append(f"**{text}**" if not math.isnan(value) and value == best[b] > 0 else text)
            lines.append(f"| {press} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def task_tables(metrics: list[dict]) -> str:
    """Per (model, length, setting, budget): tasks x presses."""
    parts = []
    for (model, length, setting), rows in runs(metrics):
        presses = sorted({r["press"] for r in rows}, key=press_order)
        tasks = sorted({r["task"] for r in rows})
        by = {(r["press"], r["budget"], r["task"]): r for r in rows}
        for budget in sorted({r["budget"] for r in rows if r["budget"] != "full"}, key=budget_sort_key):
            lines = [f"**{model}, {length} tokens, {setting.replace('_', '-')}, B={budget}**", ""]
            lines += ["| task | " + " | ".join(presses) + " |", "|---|" + "---|" * len(presses)]
            for task in tasks:
                cells = []
                for press in presses:
                    row = by.get((press, "full" if press == "full" else budget, task))
                    cells.append("-" if row is None else _fmt(row["score"]) + ("*" if row["failed"] else ""))
                lines.append(f"| {task} | " + " | ".join(cells) + " |")
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\n(* = some samples failed; see predictions.jsonl)\n"


def write_report(out: str | Path, doc: str | Path | None = None) -> list[Path]:
    """Rebuild metrics, tables and figures in ``out`` from its ``predictions.jsonl`` (the latest row
    of every sample, :func:`latest_rows`): ``metrics.csv``, ``tables.md`` (averages, the
    head-to-head verdict of each ClusterAttn configuration in the run, per-task scores, needle
    scores by depth) and the PNGs."""
    out = Path(out)
    rows = latest_rows(read_predictions(out / "predictions.jsonl"))
    if not rows:
        raise ValueError(f"no predictions in {out / 'predictions.jsonl'}")
    metrics_path = write_metrics(rows, out / "metrics.csv")
    metrics = read_metrics(metrics_path)
    ours = sorted({r["press"] for r in metrics if method_of(r["press"]) == "clusterattn"})
    headline = average_tables(metrics) + "".join(
        "\n" + head_to_head(metrics, press, predictions=rows) for press in ours
    )
    depth = depth_tables(rows)
    (out / "tables.md").write_text(
        "# Scores per task\n\n"
        + headline
        + "\n"
        + task_tables(metrics)
        + ("\n## Needle tasks by needle depth\n\n" + depth if depth else "")
    )
    figures = leaderboard(metrics, out) + score_vs_budget(metrics, out) + needle_heatmaps(rows, out)
    if doc is not None:
        _splice(Path(doc), out, headline, figures)
    return [metrics_path, out / "tables.md", *figures]


def _splice(doc: Path, out: Path, headline: str, figures: list[Path]) -> None:
    text = doc.read_text() if doc.exists() else ""
    begin, end = f"<!-- eval {out.name} begin -->", f"<!-- eval {out.name} end -->"
    rel = lambda p: Path(p).resolve().relative_to(doc.parent.resolve()).as_posix()  # noqa: E731
    images = "\n".join(f"![{Path(f).stem}]({rel(f)})" for f in figures)
    tables = rel(out / "tables.md")
    block = f"{begin}\n{headline}\nPer-task tables: [{tables}]({tables}).\n\n{images}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## Accuracy: `{out.as_posix()}`\n\n" + block + "\n"
    doc.write_text(text)
