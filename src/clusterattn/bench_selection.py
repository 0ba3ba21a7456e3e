"""DBAC's selection step against a plain top-k on the same window scores (part of
``clusterattn bench``): the share of compression time the clustering itself adds."""

from __future__ import annotations

import statistics
import time

import torch

from clusterattn import dbac_compiled
from clusterattn.presses import PRESSES

__all__ = ["selection_markdown", "selection_timing"]


def selection_timing(
    lengths=(4096, 8192, 16384), budgets=(128, 256, 512, 1024), kv_heads: int = 3, layers: int = 30,
    reps: int = 21, window: int = 32, scores: dict | None = None, batch: int = 1,
) -> list[dict]:  # fmt: skip
    """Median seconds of ClusterAttn's DBAC step vs SnapKV's plain top-k on the same scores, for all
    layers of one prompt, per prompt length and budget.

    Both are the compress step's own calls, ``select_prefix(scores, budget - window)`` of
    :class:`ClusterAttnPress` (DBAC, with its relative threshold) and of :class:`SnapKVPress`
    (``topk_indices``: one ``topk`` + ``sort``), timed in turn in every repeat (the order rotates
    each repeat) on the same ``(batch, kv_heads, prefix)`` scores, in wall and in CPU (process)
    seconds: CPU time is less disturbed by other jobs on a shared machine. DBAC is timed twice: on
    the tensor path (``dbac``, what runs on GPU or without the C kernel) and on the compiled path
    of :mod:`clusterattn.dbac_compiled` (``dbac_compiled``, the CPU default where the kernel was
    built).
    ``scores`` maps a length to real window scores ``(layers, batch, kv_heads, prefix)``; default:
    synthetic softmax scores (SmolLM2 shapes: ``batch`` rows, 3 KV heads, 30 layers). The tensor
    path costs a fixed number of tensor ops per layer whatever the size, so a larger ``batch``
    shows its ratio once that fixed cost is shared by more rows.
    """
    rows = []
    for length in lengths:
        synthetic = torch.softmax(torch.randn(layers, batch, kv_heads, length - window) * 3, dim=-1) * window
        layer_scores = synthetic if scores is None else scores[length]
        for budget in budgets:
            clusterattn = PRESSES["clusterattn"](budget=budget, window_size=window)
            steps = {  # name: (press, compiled path on)
                "dbac": (clusterattn, False),
                "dbac_compiled": (clusterattn, True),
                "topk": (PRESSES["snapkv"](budget=budget, window_size=window), False),
            }
            if not dbac_compiled.available():
                del steps["dbac_compiled"]
            wall: dict[str, list[float]] = {name: [] for name in steps}
            cpu: dict[str, list[float]] = {name: [] for name in steps}
            for rep in range(reps):
                names = list(steps)
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    press, compiled = steps[name]
                    previous = dbac_compiled.set_enabled(compiled)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    for layer in layer_scores:
                        press.select_prefix(layer, budget - window)
                    cpu[name].append(time.process_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
                    dbac_compiled.set_enabled(previous)
            row = {"length": length, "budget": budget, "batch": layer_scores.shape[1]}
            row |= {"threads": torch.get_num_threads(), "reps": reps}
            for name in steps:
                row[f"{name}_s"] = statistics.median(wall[name])
                row[f"{name}_cpu_s"] = statistics.median(cpu[name])
            row["ratio"] = row["dbac_s"] / row["topk_s"]
            row["cpu_ratio"] = row["dbac_cpu_s"] / row["topk_cpu_s"]
            if "dbac_compiled" in steps:
                row["compiled_cpu_ratio"] = row["dbac_compiled_cpu_s"] / row["topk_cpu_s"]
            rows.append(row)
    return rows


def selection_markdown(rows: list[dict]) -> list[str]:
    """The selection timing table (30 layers, medians): wall ms, CPU ms and the ratios to top-k, of
    DBAC on the tensor path and, in the last two columns, on the compiled path (the CPU default)."""
    head = (
        "| length | budget | batch | DBAC tensor ms | top-k ms | ratio | DBAC tensor CPU ms | top-k CPU ms "
        "| CPU ratio | compiled CPU ms | compiled CPU ratio |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        compiled = r.get("dbac_compiled_cpu_s")  # absent without the C kernel, and in older rows
        compiled_ms = "-" if compiled is None else f"{1e3 * compiled:.2f}"
        compiled_ratio = "-" if compiled is None else f"{compiled / r['topk_cpu_s']:.2f}"
        lines.append(
            f"| {r['length']} | {r['budget']} | {r.get('batch', 1)} | {1e3 * r['dbac_s']:.2f} "
            f"| {1e3 * r['topk_s']:.2f} "
            f"| {r['ratio']:.2f} | {1e3 * r['dbac_cpu_s']:.2f} | {1e3 * r['topk_cpu_s']:.2f} "
            f"| {r['cpu_ratio']:.2f} | {compiled_ms} | {compiled_ratio} |"
        )
    return lines
