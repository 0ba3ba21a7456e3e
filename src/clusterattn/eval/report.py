"""Metrics, Markdown tables and figures from ``predictions.jsonl`` (see :mod:`clusterattn.eval.runner`).

``write_report(out)`` rebuilds ``metrics.csv``, ``tables.md``, ``score_vs_budget_*.png`` and
``needle_heatmap_*.png`` from the predictions alone, and can splice the headline tables into a
Markdown document between ``<!-- eval NAME begin -->`` and ``<!-- eval NAME end -->`` (``NAME``: the
output folder's name, so several runs share one document).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

COLUMNS = ("model", "task", "length", "press", "budget", "setting", "n", "failed", "score")


def budget_sort_key(budget: str) -> tuple:
    if budget == "full":
        return (0, 0.0)
    if budget.startswith("r"):
        return (2, -float(budget[1:]))
    return (1, float(budget))


def _cell_key(row: dict) -> tuple:
    return (row["model"], row["task"], row["length"], row["press"], row["budget"], row["setting"])


def scored(row: dict) -> bool:
    """Whether a prediction row counts in a score: it did not fail and it has a score."""
    return row.get("error") is None and row.get("score") is not None


def latest_rows(rows: list[dict]) -> list[dict]:
    """One prediction per (model, task, length, press, budget, setting, sample index): the last one
    written, so a retried or rerun sample replaces its earlier row everywhere it is counted."""
    return list({(*_cell_key(row), row["index"]): row for row in rows}.values())


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean score (0-100) per (model, task, length, press, budget, setting), over
    :func:`latest_rows` (a retried sample replaces its failure)."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in latest_rows(rows):
        cells[_cell_key(row)].append(row)
    out = []
    for key, cell in sorted(cells.items(), key=lambda kv: (*kv[0][:4], budget_sort_key(kv[0][4]), kv[0][5])):
        scores = [r["score"] for r in cell if scored(r)]
        mean = 100.0 * sum(scores) / len(scores) if scores else float("nan")
        out.append(
            dict(zip(COLUMNS, (*key, len(scores), len(cell) - len(scores), round(mean, 2)), strict=True))
        )
    return out


def write_metrics(rows: list[dict], path: Path) -> Path:
    """Write ``metrics.csv`` (columns :data:`COLUMNS`)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(aggregate(rows))
    return path


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["length"], row["n"], row["failed"] = int(row["length"]), int(row["n"]), int(row["failed"])
        row["score"] = float(row["score"])
    return rows


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def press_order(press: str) -> tuple:
    """Sort key of press names in tables and figures: the full cache, ours, then kvpress's."""
    return (press != "full", press.startswith("kvpress"), press)


def runs(metrics: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """``metrics`` rows grouped per ``(model, length, setting)``, in sorted order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in metrics:
        groups[(row["model"], row["length"], row["setting"])].append(row)
    return sorted(groups.items())


def task_averages(rows: list[dict]) -> tuple[list[str], list[str], dict, dict]:
    """For the rows of one run: its tasks, its budgets (the full cache's left out, in order), the
    scores ``(press, budget, task) -> score`` and every compressing press's score averaged over all
    the tasks, ``(press, budget) -> mean`` (NaN when the press misses a task)."""
    tasks = sorted({r["task"] for r in rows})
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "full"}, key=budget_sort_key)
    by = {(r["press"], r["budget"], r["task"]): r["score"] for r in rows}
    presses = {r["press"] for r in rows if r["budget"] != "full"}
    average = {(p, b): _complete_mean([by.get((p, b, t)) for t in tasks]) for p in presses for b in budgets}
    return tasks, budgets, by, average


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


def _nan_low(value: float) -> float:
    return -1.0 if math.isnan(value) else value


def _complete_mean(values) -> float:
    """Mean over every task, NaN when a task is missing (averages must cover the same tasks)."""
    return float("nan") if any(v is None for v in values) else _mean(values)


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def write_report(out: str | Path, doc: str | Path | None = None) -> list[Path]:
    """Rebuild metrics, tables and figures in ``out`` from its ``predictions.jsonl`` (the latest row
    of every sample, :func:`latest_rows`): ``metrics.csv``, ``tables.md`` (averages, the
    head-to-head verdict of each ClusterAttn configuration in the run, per-task scores, needle
    scores by depth) and the PNGs."""
    from clusterattn.eval.compare import depth_tables, head_to_head, method_of
    from clusterattn.eval.plots import needle_heatmaps, score_vs_budget
    from clusterattn.eval.runner import read_predictions

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
    figures = score_vs_budget(metrics, out) + needle_heatmaps(rows, out)
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
