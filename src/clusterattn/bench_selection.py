"""DBAC's selection step against a plain top-k on the same window scores (part of
``clusterattn bench``): the share of compression time the clustering itself adds."""

from __future__ import annotations

import statistics
import time

import torch

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
    seconds: CPU time is less disturbed by other jobs on a shared machine.
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
            steps = {"dbac": clusterattn, "topk": PRESSES["snapkv"](budget=budget, window_size=window)}
            wall: dict[str, list[float]] = {name: [] for name in steps}
            cpu: dict[str, list[float]] = {name: [] for name in steps}
            for rep in range(reps):
                names = list(steps)
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    press = steps[name]
                    start, start_cpu = time.perf_counter(), time.process_time()
                    for layer in layer_scores:
                        press.select_prefix(layer, budget - window)
                    cpu[name].append(time.process_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
            row = {"length": length, "budget": budget, "batch": layer_scores.shape[1]}
            row |= {"threads": torch.get_num_threads(), "reps": reps}
            for name in steps:
                row[f"{name}_s"] = statistics.median(wall[name])
                row[f"{name}_cpu_s"] = statistics.median(cpu[name])
            row["ratio"] = row["dbac_s"] / row["topk_s"]
            row["cpu_ratio"] = row["dbac_cpu_s"] / row["topk_cpu_s"]
            rows.append(row)
    return rows


def selection_markdown(rows: list[dict]) -> list[str]:
    """The selection timing table (30 layers, medians): wall ms, CPU ms and the ratios to top-k."""
    head = "| length | budget | batch | DBAC ms | top-k ms | ratio | DBAC CPU ms | top-k CPU ms | CPU ratio |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['budget']} | {r.get('batch', 1)} | {1e3 * r['dbac_s']:.2f} "
            f"| {1e3 * r['topk_s']:.2f} "
            f"| {r['ratio']:.2f} | {1e3 * r['dbac_cpu_s']:.2f} | {1e3 * r['topk_cpu_s']:.2f} "
            f"| {r['cpu_ratio']:.2f} |"
        )
    return lines
