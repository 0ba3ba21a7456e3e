"""The paper's analysis quantities on real decode traces (``clusterattn analyze``).

For each traced sample and budget, every method of :mod:`clusterattn.analysis.clustering` keeps
``budget - w`` prefix tokens per layer and KV head from the observation window's scores (plus the
window), and is measured against the attention of the *later decode steps*:

- fitting rate: share of the decode attention mass that the kept set covers;
- hit rate: share of each decode step's ``top`` most-attended tokens that are kept (also per step:
  how stable the window-derived set stays over the decode);
- restricted cosine (what profiling maximises).

Each is reported over the prefix (the window, kept by every method, left out: the comparison
that tells the methods apart) and over the whole prompt. ``oracle`` keeps each KV head's top tokens
of the decode attention itself: the ceiling no window-based method can pass. The share-of-tokens
versus share-of-mass curve (DBAC, top-k, oracle over many budgets) shows how concentrated the
attention is in the clusters.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from clusterattn.analysis.clustering import METHODS, select_prefix
from clusterattn.analysis.metrics import fitting_rate, hit_rate, kept_mask, restricted_cosine
from clusterattn.analysis.trace import DecodeTrace
from clusterattn.dbac import topk_indices
from clusterattn.presses.clusterattn import ClusterAttnPress

ALL_METHODS = (*METHODS, "dbac_tuned", "oracle")


@dataclass
class AnalysisSpec:
    """What :func:`analyze_traces` measures: ``budgets`` (window included) for every method,
    ``curve_budgets`` for the token-share / mass-share curve, hit rate over the ``top`` tokens."""

    budgets: list[int] = field(default_factory=lambda: [128, 256])
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    curve_budgets: list[int] = field(default_factory=lambda: [48, 64, 96, 128, 192, 256, 384, 512])
    window_size: int = 32
    top: int = 16
    tuned: dict[str, dict[str, int]] = field(default_factory=dict)  # {task: {budget: num_block}}

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")
        for budget in (*self.budgets, *self.curve_budgets):
            if budget <= self.window_size:
                raise ValueError(f"budget {budget} must exceed the window ({self.window_size})")


def oracle_prefix(trace: DecodeTrace, budget: int, n_prefix: int) -> torch.Tensor:
    """``(layers, kv_heads, budget)``: each KV head's prefix tokens with the most decode attention
    (summed over its query heads and the decode steps)."""
    layers, q_heads, steps, _ = trace.attention.shape
    kv_heads = trace.keys.shape[1]
    mass = trace.attention[..., :n_prefix].reshape(layers, kv_heads, q_heads // kv_heads, steps, n_prefix)
    return topk_indices(mass.sum(dim=(2, 3)), budget)


def window_scores_of(trace: DecodeTrace, window_size: int = 32) -> torch.Tensor:
    """``(layers, kv_heads, seq - window_size)``: ClusterAttnPress's window scores on the prefill."""
    press = ClusterAttnPress(budget=window_size + 1, window_size=window_size)
    with torch.no_grad():
        return press.prefix_scores(trace.queries, trace.keys, trace.scaling, layer=0, pad_mask=None)


def method_masks(
    trace: DecodeTrace,
    budget: int,
    methods,
    window_size: int = 32,
    tuned_num_block: int | None = None,
    scores: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``{method: (layers, kv_heads, seq) bool}`` kept sets (window included) at ``budget``;
    ``dbac_tuned`` is DBAC with ``tuned_num_block`` clusters (a profile's; None: the default).
    ``scores``: :func:`window_scores_of` the trace, when already computed."""
    n_prefix = trace.seq - window_size
    if scores is None:
        scores = window_scores_of(trace, window_size)
    masks = {}
    for method in methods:
        if method == "oracle":
            keep = oracle_prefix(trace, budget - window_size, n_prefix)
        elif method == "dbac_tuned":
            keep = select_prefix(
                "dbac", scores, budget - window_size, window_size=window_size, num_block=tuned_num_block
            )
        else:
            keep = select_prefix(method, scores, budget - window_size, window_size=window_size)
        mask = kept_mask(keep, trace.seq)
        mask[..., n_prefix:] = True
        masks[method] = mask
    return masks


def measure(trace: DecodeTrace, mask: torch.Tensor, n_prefix: int, top: int) -> dict:
    """Every quantity of one kept set ``(layers, kv_heads, seq)`` on one trace."""
    attn, pre, pre_mask = trace.attention, trace.attention[..., :n_prefix], mask[..., :n_prefix]
    hits = hit_rate(pre, pre_mask, top)  # (layers, q_heads, steps)
    fit = fitting_rate(pre, pre_mask)
    return {
        "fit_prefix": float(fit.mean()),
        "fit_prompt": float(fitting_rate(attn, mask).mean()),
        "hit_prefix": float(hits.mean()),
        "hit_prompt": float(hit_rate(attn, mask, top).mean()),
        "cosine": float(restricted_cosine(attn, mask).mean()),
        "hit_by_step": hits.mean(dim=(0, 1)).tolist(),
        "fit_by_layer": fit.mean(dim=(1, 2)).tolist(),
    }


def analyze_trace(task: str, trace: DecodeTrace, spec: AnalysisSpec) -> dict:
    """Every method at every budget, and the share curve, on one trace (one row of the results)."""
    n_prefix = trace.seq - spec.window_size
    row = {
        "task": task,
        "seq": trace.seq,
        "steps": trace.steps,
        "answer": trace.text,
        "budgets": {},
        "curve": {},
    }
    scores = window_scores_of(trace, spec.window_size)
    for budget in spec.budgets:
        tuned = spec.tuned.get(task, {}).get(str(budget))
        masks = method_masks(trace, budget, spec.methods, spec.window_size, tuned, scores)
        row["budgets"][str(budget)] = {m: measure(trace, k, n_prefix, spec.top) for m, k in masks.items()}
    for budget in spec.curve_budgets:
        if budget >= trace.seq:
            continue
        masks = method_masks(trace, budget, ("dbac", "topk", "oracle"), spec.window_size, scores=scores)
        prefix = trace.attention[..., :n_prefix]
        row["curve"][str(budget)] = {"token_share": (budget - spec.window_size) / n_prefix} | {
            m: float(fitting_rate(prefix, k[..., :n_prefix]).mean()) for m, k in masks.items()
        }
    return row


def analyze_traces(traces, spec: AnalysisSpec) -> dict:
    """Measure every method at every budget on ``traces`` (an iterable of ``(task, trace)``).

    Returns ``{"methods": {budget: {method: {quantity: mean over traces}}}, "by_task": {task: ...},
    "curve": {budget: {"token_share": ..., method: mass share}}, "per_trace": [...]}``.
    """
    rows = [analyze_trace(task, trace, spec) for task, trace in tqdm(traces, desc="analysis", unit="trace")]
    if not rows:
        raise ValueError("no traces to analyse")
    return {"per_trace": rows, **summarise(rows)}


def _mean(values):
    values = list(values)
    if isinstance(values[0], list):
        width = min(len(v) for v in values)
        return [sum(v[i] for v in values) / len(values) for i in range(width)]
    return sum(values) / len(values)


def summarise(per_trace: list[dict]) -> dict:
    """Means over traces, overall and per task, of every quantity; and the mean share curve."""
    overall: dict = defaultdict(dict)
    by_task: dict = defaultdict(lambda: defaultdict(dict))
    tasks = sorted({r["task"] for r in per_trace})
    for budget in per_trace[0]["budgets"]:
        for method in per_trace[0]["budgets"][budget]:
            for scope, rows in [
                (None, per_trace),
                *[(t, [r for r in per_trace if r["task"] == t]) for t in tasks],
            ]:
                cells = [r["budgets"][budget][method] for r in rows]
                mean = {q: _mean(c[q] for c in cells) for q in cells[0]}
                (overall[budget] if scope is None else by_task[scope][budget])[method] = mean
    curve: dict = {}
    budgets = sorted({b for r in per_trace for b in r["curve"]}, key=int)
    for budget in budgets:
        rows = [r["curve"][budget] for r in per_trace if budget in r["curve"]]
        curve[budget] = {k: _mean(x[k] for x in rows) for k in rows[0]}
    return {"methods": dict(overall), "by_task": {t: dict(v) for t, v in by_task.items()}, "curve": curve}
