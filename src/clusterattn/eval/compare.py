"""One press against the rest: the head-to-head verdict and the needle-depth breakdown of a run.

:func:`head_to_head` answers "is this press the best at every budget, and by how much does it lead
or trail?" from ``metrics.csv`` rows; :func:`depth_tables` splits the needle tasks' scores by where
the needle sits in the context, which is what separates query-aware from query-agnostic
compression (without the question, a press can only guess which part of the context matters).
"""

from __future__ import annotations

import math
from collections import defaultdict

from clusterattn.eval.bootstrap import gap_interval, paired_differences
from clusterattn.eval.metrics import _fmt, budget_sort_key, press_order, runs, scored, task_averages

DEPTH_QUARTERS = ("0-25 %", "25-50 %", "50-75 %", "75-100 %")


def head_to_head(
    metrics: list[dict],
    press: str = "clusterattn",
    margin: float = 3.0,
    predictions: list[dict] | None = None,
) -> str:
    """Markdown: per (model, length, setting) and budget, ``press``'s task-averaged score against
    the best other press's (same tasks), the gap (positive: ``press`` leads), the verdict (best,
    within ``margin`` points, or behind) and on how many tasks ``press`` scores at least as high as
    every other press, out of the tasks where some press scores above 0. Presses missing a task are
    left out of that budget's comparison; an empty string when ``press`` has no rows. Other
    configurations of the same press (``clusterattn:recent_ratio=0.5`` for ``clusterattn``, and the
    reverse) are not rivals: the verdict is the method's against the other methods.

    With ``predictions`` (the run's latest rows, :func:`~clusterattn.eval.report.latest_rows`), a
    column gives the gap's 95 % paired bootstrap interval (:mod:`clusterattn.eval.bootstrap`) against
    that best other press: how large a gap the samples alone can make."""
    parts = []
    for (model, length, setting), rows in runs(metrics):
        if not any(r["press"] == press for r in rows):
            continue
        tasks, budgets, by, average = task_averages(rows)
        run_rows = None
        if predictions is not None:
            run = (model, length, setting)
            run_rows = [r for r in predictions if (r["model"], r["length"], r["setting"]) == run]
        interval_head = " 95 % interval of the gap |" if run_rows is not None else ""
        lines = [
            f"**{model}, {length} tokens, {setting.replace('_', '-')}: {press} against the best other "
            f"press** ({len(tasks)} tasks)",
            "",
            f"| budget | {press} | best other | gap |{interval_head} verdict | tasks where {press} is "
            "best (ties count; tasks where every press scores 0 are left out) |",
            "|---|---|---|---|" + ("---|" if run_rows is not None else "") + "---|---|",
        ]
        method = method_of(press)  # other configurations of the same press are not rivals
        for budget in budgets:
            ours = average.get((press, budget), math.nan)
            rivals = {p: v for (p, b), v in average.items() if b == budget and method_of(p) != method}
            rivals = {p: v for p, v in rivals.items() if not math.isnan(v)}
            if math.isnan(ours) or not rivals:
                continue
            best = max(rivals, key=lambda p: (rivals[p], p))
            gap = ours - rivals[best]
            verdict = "best" if gap >= 0 else f"within {margin:g}" if gap >= -margin else "behind"
            top = {t: max(by[p, budget, t] for p in rivals) for t in tasks}
            scored = [t for t in tasks if max(by[press, budget, t], top[t]) > 0]
            wins = sum(by[press, budget, t] >= top[t] for t in scored)
            interval = ""
            if run_rows is not None:
                differences = paired_differences(run_rows, press, best, budget)
                interval = " - |"
                if differences:
                    low, high = gap_interval(differences)
                    interval = f" {_signed(low)} to {_signed(high)} |"
            lines.append(
                f"| {budget} | {_fmt(ours)} | {best} {_fmt(rivals[best])} | {gap:+.1f} |{interval} "
                f"{verdict} | {wins} of {len(scored)} |"
            )
        if len(lines) > 4:  # some budget had a complete comparison
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n" if parts else "")


def _signed(value: float) -> str:
    """``value`` with its sign and one decimal; a value that rounds to zero prints ``+0.0``."""
    return f"{round(value, 1) + 0.0:+.1f}"


def method_of(label: str) -> str:
    """The press a label configures: ``clusterattn`` for ``clusterattn:recent_ratio=0.5``;
    ``kvpress:snapkv`` for ``kvpress:snapkv:window_size=32``."""
    parts = label.split(":")
    return ":".join(parts[:2]) if parts[0] == "kvpress" else parts[0]


def depth_tables(rows: list[dict]) -> str:
    """Markdown: per (model, length, setting, budget), the needle tasks' mean score (0-100) of every
    press by the quarter of the context the needle sits in, with the sample count per quarter;
    the full cache's row is repeated in every table. ``rows`` are predictions (use
    :func:`~clusterattn.eval.report.latest_rows`); rows without a depth are ignored."""
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("depth") is None or not scored(row):
            continue
        quarter = min(int(row["depth"] * 4), 3)
        key = (row["model"], row["length"], row["setting"], row["budget"])
        cells[key][(row["press"], quarter)].append(row["score"])
    parts = []
    for (model, length, setting, budget), values in sorted(cells.items(), key=_depth_order):
        if budget == "full":
            continue
        values = {**cells.get((model, length, setting, "full"), {}), **values}
        presses = sorted({p for p, _ in values}, key=press_order)
        counts = [len(values.get(("full" if "full" in presses else presses[0], q), [])) for q in range(4)]
        head = " | ".join(f"{name} (n={n})" for name, n in zip(DEPTH_QUARTERS, counts, strict=True))
        lines = [
            f"**{model}, {length} tokens, {setting.replace('_', '-')}, B={budget}: needle tasks by "
            "needle depth**",
            "",
            f"| press | {head} |",
            "|---|" + "---|" * 4,
        ]
        for press in presses:
            scores = [values.get((press, q), []) for q in range(4)]
            cells_text = [_fmt(100.0 * sum(s) / len(s)) if s else "-" for s in scores]
            lines.append(f"| {press} | " + " | ".join(cells_text) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n" if parts else "")


def _depth_order(item) -> tuple:
    model, length, setting, budget = item[0]
    return (model, length, setting, budget_sort_key(budget))
