"""Scores from prediction rows: the latest row per sample, per-cell aggregates (``metrics.csv``),
and the orderings and averages every table and figure of a report shares.

The bottom of the evaluation's one-way order: predictions -> metrics -> compare / bootstrap /
plots -> report.
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


def _nan_low(value: float) -> float:
    return -1.0 if math.isnan(value) else value


def _complete_mean(values) -> float:
    """Mean over every task, NaN when a task is missing (averages must cover the same tasks)."""
    return float("nan") if any(v is None for v in values) else _mean(values)


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")
