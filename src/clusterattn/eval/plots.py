"""Figures of an evaluation run: the leaderboard (average score vs compression ratio), score vs budget
per task and press, needle depth x length heatmaps."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from clusterattn.eval.metrics import press_order, runs, task_averages

DEPTH_BINS = 5


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_OURS = ("tab:red", "darkred", "lightcoral", "maroon")  # ClusterAttn and its configurations
_OTHERS = (
    "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive",
    "tab:cyan", "black",
)  # fmt: skip


def _styles(presses: list[str]) -> dict[str, dict]:
    """A line style per press, no two alike: ClusterAttn thick and in reds (each configuration its
    own shade and dash; the dashes shift once the shades wrap), every other press thin in a colour
    that is never red (kvpress's dashed; the marker changes once the colours wrap)."""
    ours = [p for p in presses if p == "clusterattn" or p.startswith("clusterattn:")]
    others = [p for p in presses if p not in ours]
    styles = {}
    for i, press in enumerate(ours):
        dash = ("-", "--", "-.", ":")[(i + i // len(_OURS)) % 4]
        styles[press] = {"linewidth": 2.6, "color": _OURS[i % len(_OURS)], "linestyle": dash, "marker": "o"}
    groups = (
        [p for p in others if p.startswith("kvpress:")],
        [p for p in others if not p.startswith("kvpress:")],
    )
    for dash, group in zip(("--", "-"), groups, strict=True):
        for i, press in enumerate(group):
            styles[press] = {
                "linewidth": 1.2,
                "color": _OTHERS[i % len(_OTHERS)],
                "linestyle": dash,
                "marker": (".", "x", "^", "s")[(i // len(_OTHERS)) % 4],
            }
    return styles


def _wrapped(label: str, width: int = 44) -> str:
    """``label`` broken after commas into lines of about ``width`` characters (a press spec with
    many fields, e.g. ``clusterattn:scorer=leverage,...``, would otherwise crowd out the axes)."""
    lines = [""]
    for part in label.split(","):
        piece = part if not lines[-1] else "," + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines[-1] += ","
            lines.append("  " + part)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def score_vs_budget(metrics: list[dict], out: Path) -> list[Path]:
    """One PNG per (model, length, setting) that has token budgets: a panel per task plus the
    average, token budgets only (a run of ratio budgets alone is drawn by :func:`leaderboard`)."""
    plt = _pyplot()
    paths = []
    for (model, length, setting), rows in runs(metrics):
        budgets = sorted({int(r["budget"]) for r in rows if r["budget"].isdigit()})
        if not budgets:
            continue
        tasks = sorted({r["task"] for r in rows})
        panels = [*tasks, "average"]
        cols = min(5, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True)
        by = {(r["press"], r["budget"], r["task"]): r["score"] for r in rows}
        presses = sorted({r["press"] for r in rows if r["budget"] != "full"})
        styles = _styles(presses)
        for ax, panel in zip(axes.flat, panels, strict=False):
            for press in presses:
                ys = [_panel_value(by, press, str(b), panel, tasks) for b in budgets]
                ax.plot(budgets, ys, label=press, **styles[press])
            full = _panel_value(by, "full", "full", panel, tasks)
            if not math.isnan(full):
                ax.axhline(full, color="black", linestyle=":", linewidth=1.2, label="full cache")
            ax.set_title(panel, fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlim(budgets[0] / 1.25, budgets[-1] * 1.25)  # set, not fitted: a panel may have no data
            ax.set_xticks(budgets, [str(b) for b in budgets], fontsize=7)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
        fig.suptitle(f"{model}, {length} tokens, {setting.replace('_', '-')}: score (0-100) vs budget B")
        fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 6), 1, 0.96))
        path = Path(out) / f"score_vs_budget_{model}_{length}_{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def leaderboard(metrics: list[dict], out: Path) -> list[Path]:
    """One PNG with a panel per (model, length, setting) that has compression-ratio budgets
    (``r0.5``, ...): each press's score averaged over the run's tasks against the compression factor
    ``1 / (1 - ratio)`` (2:1 ... 32:1), the full cache as a dotted line, as kvpress's leaderboard
    plots it. Token budgets stay in the score-vs-budget figures."""
    plt = _pyplot()
    panels = []
    for (model, length, setting), rows in runs(metrics):
        tasks, budgets, _, average = task_averages(rows)
        ratios = sorted((b for b in budgets if b.startswith("r")), key=lambda b: float(b[1:]))
        if ratios:
            presses = sorted({p for p, b in average if b in ratios}, key=press_order)
            panels.append(((model, length, setting), rows, tasks, ratios, average, presses))
    if not panels:
        return []
    # past 8 lines the legend goes beside each panel (inside, it covers the lines and the title)
    beside = max(len(panel[-1]) for panel in panels) > 8
    width = 5.2 + (3.6 if beside else 0.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=True):
        (model, length, setting), rows, tasks, ratios, average, presses = panel
        factors = [1.0 / (1.0 - float(b[1:])) for b in ratios]
        styles = _styles(presses)
        for press in presses:
            label = _wrapped(press) if beside else press
            ax.plot(factors, [average[press, b] for b in ratios], label=label, **styles[press])
        full = [r["score"] for r in rows if r["budget"] == "full"]
        top = max([average[p, b] for p in presses for b in ratios if not math.isnan(average[p, b])] or [0])
        if len(full) == len(tasks):
            ax.axhline(float(np.mean(full)), color="black", linestyle=":", linewidth=1.2, label="full cache")
            top = max(top, float(np.mean(full)))
        ax.set_ylim(0, min(103, top + 8))
        ax.set_xscale("log", base=2)
        # set, not fitted: a press still running has no average over every task yet (all NaN)
        ax.set_xlim(factors[0] / 1.25, factors[-1] * 1.25)
        ax.set_xticks(factors, [f"{f:.0f}:1" for f in factors], fontsize=8)
        ax.set_xlabel("compression (prompt tokens : kept tokens)", fontsize=8)
        ax.set_ylabel(f"average score over {len(tasks)} tasks", fontsize=8)
        ax.set_title(f"{model}, {length} tokens, {setting.replace('_', '-')}", fontsize=9)
        ax.grid(alpha=0.3)
        if beside:
            ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(out) / "leaderboard.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend beside a panel stays in the picture
    plt.close(fig)
    return [path]


def _panel_value(by: dict, press: str, budget: str, panel: str, tasks: list[str]) -> float:
    if panel != "average":
        return by.get((press, budget, panel), float("nan"))
    values = [by.get((press, budget, t)) for t in tasks]
    if any(v is None for v in values):
        return float("nan")
    return float(np.mean(values))


def needle_heatmaps(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per (model, setting, budget): a depth x context-length heatmap per press, over the
    niah tasks (mean score of the samples whose needle depth falls in each bin)."""
    plt = _pyplot()
    cells: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if not row["task"].startswith("niah") or row.get("depth") is None or row.get("error"):
            continue
        depth_bin = min(int(row["depth"] * DEPTH_BINS), DEPTH_BINS - 1)
        budget = row["budget"]
        key = (row["model"], row["setting"], budget)
        cells[key][(row["press"], row["length"], depth_bin)].append(row["score"])
    full_cells = {k[:2]: v for k, v in cells.items() if k[2] == "full"}
    paths = []
    for (model, setting, budget), values in sorted(cells.items()):
        if budget == "full":
            continue
        values = {**{k: v for k, v in full_cells.get((model, setting), {}).items()}, **values}
        presses = sorted({k[0] for k in values}, key=press_order)
        lengths = sorted({k[1] for k in values})
        fig, axes = plt.subplots(
            1, len(presses), figsize=(1.2 + 1.0 * len(lengths) * len(presses), 3.0), squeeze=False
        )
        for ax, press in zip(axes.flat, presses, strict=True):
            grid = np.full((DEPTH_BINS, len(lengths)), np.nan)
            for j, length in enumerate(lengths):
                for d in range(DEPTH_BINS):
                    scores = values.get((press, length, d))
                    if scores:
                        grid[d, j] = 100.0 * float(np.mean(scores))
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_title(press.replace(":", "\n").replace(",", ",\n"), fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths], fontsize=7)
            if ax is not axes.flat[0]:
                ax.set_yticks([])
                continue
            ax.set_yticks(
                range(DEPTH_BINS),
                [f"{100 * d // DEPTH_BINS}-{100 * (d + 1) // DEPTH_BINS}%" for d in range(DEPTH_BINS)],
                fontsize=7,
            )
        axes.flat[0].set_ylabel("needle depth")
        fig.colorbar(image, ax=list(axes.flat), fraction=0.02)
        fig.suptitle(
            f"{model}, {setting.replace('_', '-')}, B={budget}: niah score by depth and length",
            fontsize=9,
            y=1.12,
        )
        path = Path(out) / f"needle_heatmap_{model}_{setting}_{budget}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
