"""Paired bootstrap intervals for the score gap between two presses.

A head-to-head verdict ("within 3 points of the best") is read off task averages of a handful of
samples per task: with 10 samples one needle is 10 points of its task. The interval says how much
of a gap the samples themselves can produce. Both presses are scored on the same prompts, so the
resampling is *paired* (one draw of sample indices serves both) and *stratified by task* (each task
keeps its own sample count and the task set stays fixed, as in the reported average). The gap of
one resample is the mean over tasks of the per-task mean score difference, in points (0-100).
"""

from __future__ import annotations

import torch

from clusterattn.eval.metrics import scored

RESAMPLES = 2000
SEED = 0


def paired_differences(rows: list[dict], press: str, rival: str, budget: str) -> dict[str, torch.Tensor]:
    """``{task: (n,) float64}`` score differences ``press - rival`` (0-100) on the samples both have
    a score for at ``budget``. ``rows``: the latest prediction rows of one (model, length, setting);
    failed samples are left out."""
    scores: dict[tuple, dict[int, float]] = {}
    for row in rows:
        if scored(row) and row["press"] in (press, rival) and row["budget"] == budget:
            scores.setdefault((row["press"], row["task"]), {})[row["index"]] = float(row["score"])
    out = {}
    for task in sorted({t for _, t in scores}):
        ours, theirs = scores.get((press, task), {}), scores.get((rival, task), {})
        common = sorted(set(ours) & set(theirs))
        if common:
            out[task] = 100.0 * torch.tensor([ours[i] - theirs[i] for i in common], dtype=torch.float64)
    return out


def bootstrap_gaps(
    differences: dict[str, torch.Tensor], resamples: int = RESAMPLES, seed: int = SEED
) -> torch.Tensor:
    """``(resamples,)`` task-averaged gaps, each from one draw of sample indices with replacement
    within every task (tasks in sorted order, one ``randint`` of ``(resamples, n)`` per task from a
    generator seeded with ``seed``, so the draws are reproducible)."""
    if not differences:
        raise ValueError("no paired samples to resample")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    generator = torch.Generator().manual_seed(seed)
    means = []
    for task in sorted(differences):
        diff = differences[task]
        draws = torch.randint(len(diff), (resamples, len(diff)), generator=generator)
        means.append(diff[draws].mean(dim=-1))
    return torch.stack(means, dim=-1).mean(dim=-1)


def gap_interval(
    differences: dict[str, torch.Tensor], level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile interval ``(low, high)`` at ``level`` of :func:`bootstrap_gaps`, in points."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    gaps = bootstrap_gaps(differences, resamples, seed)
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(gaps, torch.tensor([tail, 1.0 - tail], dtype=gaps.dtype)).tolist()
    return low, high
