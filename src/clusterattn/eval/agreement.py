"""Two runs of the same grid side by side: do their answers agree?

A cheaper way to run the grid (bf16 weights instead of fp32, another thread count, another machine)
is only worth taking if it keeps the answers. :func:`compare_runs` pairs the two runs' prediction
rows that answer the same question (model, task, length, setting, sample seed and index, press,
budget) and counts, per press and budget, the answers that are identical and the scores that are
equal; it also sets the two runs' prefill times side by side. ``clusterattn eval-compare A B`` prints
:func:`agreement_table` of two run folders.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from clusterattn.eval.metrics import _fmt, budget_sort_key, latest_rows, press_order, scored
from clusterattn.eval.predictions import read_predictions

_SAMPLE = ("model", "task", "length", "setting", "seed", "index")


def _key(row: dict) -> tuple:
    return (*(row[k] for k in _SAMPLE), row["press"], row["budget"])


def compare_runs(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Agreement of two runs' prediction rows (``predictions.jsonl`` rows; the latest row per
    sample counts, failed rows are left out).

    Returns ``{"cells": [...], "all": {...}, "only_a": int, "only_b": int, "prefill_ratio": float}``:
    one cell per (press, budget) in table order, each with ``press``, ``budget``, ``n`` (paired
    rows), ``identical`` (answers equal after stripping white space), ``same_score`` and the mean
    scores ``score_a`` / ``score_b`` (0-100); ``all`` sums every cell; ``only_a`` / ``only_b`` count
    the rows without a partner; ``prefill_ratio`` is the median over paired prompts of run A's
    prefill seconds over run B's (NaN without timings).

    Raises:
        ValueError: the runs share no row (different seeds, tasks or lengths).
    """
    a = {_key(r): r for r in latest_rows(rows_a) if scored(r)}
    b = {_key(r): r for r in latest_rows(rows_b) if scored(r)}
    common = a.keys() & b.keys()
    if not common:
        raise ValueError(
            "the two runs share no scored row (same model, task, length, setting, seed, sample index, "
            "press and budget): compare runs of the same grid"
        )
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for key in common:
        groups[key[-2:]].append(key)
    cells = [_cell(press, budget, [(a[k], b[k]) for k in keys]) for (press, budget), keys in groups.items()]
    cells.sort(key=lambda c: (press_order(c["press"]), budget_sort_key(c["budget"])))
    pairs = [(a[k], b[k]) for k in common]
    return {
        "cells": cells,
        "all": _cell("all", "", pairs),
        "only_a": len(a.keys() - common),
        "only_b": len(b.keys() - common),
        "prefill_ratio": _prefill_ratio(pairs),
    }


def _cell(press: str, budget: str, pairs: list[tuple[dict, dict]]) -> dict:
    return {
        "press": press,
        "budget": budget,
        "n": len(pairs),
        "identical": sum(ra["prediction"].strip() == rb["prediction"].strip() for ra, rb in pairs),
        "same_score": sum(ra["score"] == rb["score"] for ra, rb in pairs),
        "score_a": 100 * statistics.fmean(ra["score"] for ra, _ in pairs),
        "score_b": 100 * statistics.fmean(rb["score"] for _, rb in pairs),
    }


def _prefill_ratio(pairs: list[tuple[dict, dict]]) -> float:
    """Median of A's prefill time over B's, one value per prompt (every row of a prompt shares its
    prefill, so one row per prompt counts)."""
    per_prompt = {}
    for ra, rb in pairs:
        ta, tb = ra.get("prefill_s"), rb.get("prefill_s")
        if ta and tb:
            per_prompt[tuple(ra[k] for k in _SAMPLE)] = ta / tb
    return statistics.median(per_prompt.values()) if per_prompt else float("nan")


def agreement_table(result: dict, labels: tuple[str, str] = ("A", "B")) -> str:
    """Markdown of :func:`compare_runs`: one line per press and budget, then all rows together."""
    la, lb = labels
    lines = [
        f"| press | budget | paired rows | identical answers | same score | score {la} | score {lb} |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in [*result["cells"], result["all"]]:
        name = "**all**" if c["press"] == "all" else c["press"]
        share = 100 * c["identical"] / c["n"]
        lines.append(
            f"| {name} | {c['budget']} | {c['n']} | {c['identical']} ({share:.1f} %) | {c['same_score']} "
            f"| {_fmt(c['score_a'])} | {_fmt(c['score_b'])} |"
        )
    lines.append("")
    lines.append(
        f"Rows only in {la}: {result['only_a']}; only in {lb}: {result['only_b']}. Median prefill time "
        f"{la} / {lb} per prompt: {result['prefill_ratio']:.2f}x."
    )
    return "\n".join(lines) + "\n"


def compare_folders(a: str | Path, b: str | Path, labels: tuple[str, str] = ("A", "B")) -> str:
    """:func:`agreement_table` of two eval run folders (their ``predictions.jsonl``)."""
    rows = [read_predictions(Path(p) / "predictions.jsonl") for p in (a, b)]
    for path, r in zip((a, b), rows, strict=True):
        if not r:
            raise FileNotFoundError(f"{path} holds no predictions.jsonl rows")
    return agreement_table(compare_runs(*rows), labels)
