"""Per-task hyper-parameter profiling of ClusterAttn on a seeded 20 % split (``clusterattn profile``).

For every profile sample the full cache prefills the prompt and greedily decodes (recording each
decode query's attention over the prompt, :func:`~clusterattn.analysis.trace.trace_decode`). For
every budget and candidate ``(num_block, alpha, window_size)``, the press's own selection runs on the
recorded prefill alone, and the candidate scores the cosine between each decode query's attention
and the same attention restricted to the kept tokens (renormalised), averaged over decode steps,
query heads, layers and samples; with ``objective="answer"`` the candidates are ranked instead by the
mean log-probability their compressed cache gives to the full cache's own answer
(:mod:`clusterattn.analysis.fidelity`). The best candidate per budget is written to a JSON profile that
:meth:`clusterattn.ClusterAttnPress.from_profile` loads (``budget=`` picks the budget's entry); the
held-out 80 % indices are recorded in it for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from clusterattn.analysis.data import TaskSample, check_task, load_samples, score, split
from clusterattn.analysis.metrics import kept_mask, restricted_cosine
from clusterattn.analysis.trace import DecodeTrace, EmptyAnswer, trace_decode
from clusterattn.dbac import default_num_block
from clusterattn.presses.clusterattn import ClusterAttnPress

FORMAT = 1
NUM_BLOCK_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def num_block_grid(budget: int, window_size: int, span_width: int = 16) -> list[int]:
    """Candidate cluster counts for a budget: a ladder from 1 cluster to plain top-k (``b`` clusters
    of one token, ``b = budget - window_size``), with the press's default number of clusters."""
    b = budget - window_size
    return sorted({n for n in NUM_BLOCK_LADDER if n <= b} | {b, default_num_block(b, span_width)})


OBJECTIVES = ("cosine", "answer")
RULES = ("mean", "dominant")


@dataclass
class ProfileGrid:
    """What is searched: ``num_blocks`` (None: :func:`num_block_grid` per budget and window) for
    every budget, crossed with ``alphas`` and ``window_sizes``, and how candidates are ranked:
    ``objective`` ``"cosine"`` (the restricted-attention cosine of the decode queries, the paper's
    procedure as method.md reconstructs it) or ``"answer"`` (the teacher-forced log-probability of
    the full cache's answer, :func:`clusterattn.analysis.fidelity.answer_logprobs`). ``rule``
    ``"mean"`` takes the best mean over the profile samples; ``"dominant"`` leaves the default only
    for a candidate that beats it on every profile sample (see :func:`choose`)."""

    budgets: list[int] = field(default_factory=lambda: [128, 256])
    num_blocks: list[int] | None = None
    alphas: list[float] = field(default_factory=lambda: [1.0])
    window_sizes: list[int] = field(default_factory=lambda: [32])
    objective: str = "cosine"
    rule: str = "mean"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if not self.budgets or not self.alphas or not self.window_sizes:
            raise ValueError("budgets, alphas and window_sizes must be non-empty")
        if self.num_blocks is not None and (not self.num_blocks or min(self.num_blocks) < 1):
            raise ValueError(f"num_blocks must be positive ints, got {self.num_blocks}")
        if min(self.alphas) < 0:
            raise ValueError(f"alphas must be >= 0, got {self.alphas}")
        for budget in self.budgets:
            for window in self.window_sizes:
                if window < 1 or budget <= window:
                    raise ValueError(f"budget {budget} must exceed window_size {window} (>= 1)")

    def candidates(self, budget: int) -> list[dict]:
        """Press configurations (``ClusterAttnPress`` fields) to score at ``budget``."""
        out = []
        for window in self.window_sizes:
            blocks = self.num_blocks or num_block_grid(budget, window)
            for alpha in self.alphas:
                for num_block in blocks:
                    if num_block <= budget - window:
                        out.append(
                            {"budget": budget, "num_block": num_block, "alpha": alpha, "window_size": window}
                        )
        return out


def default_config(budget: int) -> dict:
    """The configuration of ``ClusterAttnPress(budget=budget)`` in the profile's terms."""
    press = ClusterAttnPress(budget=budget)
    b = budget - press.window_size
    return {
        "budget": budget,
        "num_block": default_num_block(b, press.span_width, press.max_clusters),
        "alpha": press.alpha,
        "window_size": press.window_size,
    }


def score_candidates(trace: DecodeTrace, configs: list[dict]) -> torch.Tensor:
    """Mean restricted-attention cosine of each configuration on one trace, ``(len(configs),)``.

    Window scores are computed once per window size (the press's ``prefix_scores``) and every
    candidate applies the press's own ``select_prefix`` to them, exactly what ``select`` does.
    """
    out = torch.empty(len(configs))
    scores_by_window: dict[int, torch.Tensor] = {}
    for i, config in enumerate(configs):
        press = ClusterAttnPress(**config)
        if trace.seq <= press.budget:
            out[i] = 1.0
            continue
        w = press.window_size
        if w not in scores_by_window:
            with torch.no_grad():
                scores_by_window[w] = press.prefix_scores(
                    trace.queries, trace.keys, trace.scaling, layer=0, pad_mask=None
                )
        keep = press.select_prefix(scores_by_window[w], press.budget - w)
        mask = kept_mask(keep, trace.seq)
        mask[..., trace.seq - w :] = True
        out[i] = restricted_cosine(trace.attention, mask).mean()
    return out


def choose(configs: list[dict], per_sample: torch.Tensor, budget: int, rule: str = "mean") -> dict:
    """The best configuration by its mean over the samples of ``per_sample`` ``(samples, configs)``
    (higher is better); among equal means (to 1e-6) the default, then fewer clusters.

    ``rule="dominant"`` only considers candidates that beat the default on every sample (by more
    than 1e-6), and keeps the default when none does: a handful of profile samples is weak evidence,
    and a mean can be carried by one of them."""
    default = default_config(budget)
    objective = per_sample.mean(0)
    if rule == "dominant":
        if default not in configs:
            raise ValueError("rule 'dominant' needs the default configuration among the candidates")
        beats = (per_sample > per_sample[:, configs.index(default)].unsqueeze(1) + 1e-6).all(0)
        if not bool(beats.any()):
            return default
        objective = torch.where(beats, objective, float("-inf"))
    best = float(objective.max())
    tied = [c for c, v in zip(configs, objective.tolist(), strict=True) if v >= best - 1e-6]
    if default in tied:
        return default
    return min(tied, key=lambda c: (c["num_block"], c["window_size"], c["alpha"]))


def budget_configs(grid: ProfileGrid, budget: int) -> list[dict]:
    """The candidates scored at ``budget``: the grid's, and the default configuration."""
    configs = grid.candidates(budget)
    if (default := default_config(budget)) not in configs:
        configs.append(default)
    return configs


def profile_traces(
    traces: list[DecodeTrace], grid: ProfileGrid, answer: dict[int, torch.Tensor] | None = None
) -> tuple[dict, list[dict]]:
    """Score every candidate on every trace; returns ``({budget: entry}, rows)``.

    ``answer`` (needed for ``grid.objective == "answer"``): ``{budget: (traces, configs)}`` answer
    log-probabilities of :func:`budget_configs`' candidates, which then rank them.
    """
    if grid.objective == "answer" and answer is None:
        raise ValueError("objective 'answer' needs the candidates' answer log-probabilities")
    entries, rows = {}, []
    for budget in grid.budgets:
        configs = budget_configs(grid, budget)
        default = default_config(budget)
        per_trace = torch.stack([score_candidates(t, configs) for t in traces])  # (traces, configs)
        mean = per_trace.mean(0)
        logp = answer[budget] if grid.objective == "answer" else None
        for j, (config, value, column) in enumerate(
            zip(configs, mean.tolist(), per_trace.T.tolist(), strict=True)
        ):
            row = {**config, "cosine": value, "per_sample": column}
            if logp is not None:
                row |= {"answer_logprob": float(logp[:, j].mean()), "answer_per_sample": logp[:, j].tolist()}
            rows.append(row)
        best = choose(configs, per_trace if logp is None else logp, budget, grid.rule)
        entry = {
            "config": best,
            "cosine": float(mean[configs.index(best)]),
            "default_config": default,
            "default_cosine": float(mean[configs.index(default)]),
            "objective": grid.objective,
            "rule": grid.rule,
        }
        if logp is not None:
            entry["answer_logprob"] = float(logp[:, configs.index(best)].mean())
            entry["default_answer_logprob"] = float(logp[:, configs.index(default)].mean())
        entries[str(budget)] = entry
    return entries, rows


@dataclass
class ProfileSpec:
    """A profiling run: ``task`` (``niah``, a RULER task, or a .jsonl file) at ``length`` tokens,
    ``n_samples`` samples of which a seeded ``fraction`` is profiled, ``steps`` decode queries each."""

    task: str
    length: int = 2048
    n_samples: int = 15
    fraction: float = 0.2
    seed: int = 0
    steps: int = 32
    stop_at_eos: bool = True
    model: str = "smollm2-135m"

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.length < 128:
            raise ValueError(f"length must be >= 128, got {self.length}")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (a profile and a held-out part), got {self.n_samples}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if not 1 <= self.steps <= 256:
            raise ValueError(f"steps must be in [1, 256], got {self.steps}")


def trace_samples(model, tokenizer, samples: list[TaskSample], steps: int, stop_at_eos: bool = True, desc=""):
    """``{sample index: trace}`` of ``samples`` (a tqdm bar over them); a sample whose answer ends at
    once (no decode query) is left out."""
    traces = {}
    for s in tqdm(samples, desc=desc or "tracing", unit="sample"):
        try:
            traces[s.index] = trace_decode(
                model,
                tokenizer,
                s.context,
                s.question,
                answer_prefix=s.answer_prefix,
                steps=steps,
                stop_at_eos=stop_at_eos,
            )
        except EmptyAnswer:
            continue
    return traces


def profile_task(model, tokenizer, spec: ProfileSpec, grid: ProfileGrid | None = None, out=None) -> dict:
    """Profile ``spec.task`` on its seeded profile split; returns (and writes to ``out``) the profile.

    The returned dict has ``config`` (the first budget's best configuration, so that
    ``ClusterAttnPress.from_profile(path)`` works as before), ``budgets`` (one entry per budget,
    picked by ``from_profile(path, budget=...)``), ``split`` (profile and held-out indices) and
    ``grid`` (every candidate's cosine).
    """
    grid = grid or ProfileGrid()
    samples = load_samples(spec.task, spec.length, spec.n_samples, tokenizer, seed=spec.seed)
    profile_idx, heldout_idx = split(len(samples), spec.fraction, spec.seed)
    traced = trace_samples(
        model,
        tokenizer,
        [samples[i] for i in profile_idx],
        spec.steps,
        spec.stop_at_eos,
        desc=f"profile {Path(spec.task).stem}",
    )
    if not traced:
        raise ValueError(f"no profile sample of {spec.task} has a non-empty answer to measure")
    traces = list(traced.values())
    answer = None
    if grid.objective == "answer":
        from clusterattn.analysis.fidelity import answer_logprobs

        by_index = {s.index: s for s in samples}
        configs = [budget_configs(grid, b) for b in grid.budgets]
        flat = [c for group in configs for c in group]
        per_sample = [  # one shared full prefill per sample for every budget's candidates
            answer_logprobs(model, tokenizer, by_index[i], t.new_tokens, flat).split(
                [len(g) for g in configs]
            )
            for i, t in tqdm(traced.items(), desc="answer log-probabilities", unit="sample")
        ]
        answer = {b: torch.stack([s[k] for s in per_sample]) for k, b in enumerate(grid.budgets)}
    entries, rows = profile_traces(traces, grid, answer)
    first = entries[str(grid.budgets[0])]
    result = {
        "format": FORMAT,
        **asdict(spec),
        "objective": grid.objective,
        "rule": grid.rule,
        "config": first["config"],
        "budgets": entries,
        "split": {
            "fraction": spec.fraction,
            "seed": spec.seed,
            "n_samples": len(samples),
            "profile_indices": profile_idx,
            "heldout_indices": heldout_idx,
        },
        "traces": [
            {"index": i, "prompt_tokens": t.seq, "steps": t.steps, "answer": t.text}
            for i, t in traced.items()
        ],
        "skipped_empty_answers": [i for i in profile_idx if i not in traced],
        "grid": rows,
    }
    if out is not None:
        write_json(out, result)
    return result


def write_json(path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def evaluate_heldout(
    model,
    tokenizer,
    profile_path,
    *,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    budgets: list[int] | None = None,
) -> dict:
    """Accuracy of the full cache, the default press and the tuned press (``from_profile``) on the
    profile's held-out samples at ``budgets`` (default: every profiled budget); one shared prefill
    per sample. Stored in the profile under ``heldout`` and returned. ``max_new_tokens`` caps the
    task's own generation length."""
    from clusterattn.generation import generate_many

    path = Path(profile_path)
    profile = json.loads(path.read_text())
    indices = profile["split"]["heldout_indices"][:max_samples]
    samples = load_samples(
        profile["task"], profile["length"], profile["split"]["n_samples"], tokenizer, seed=profile["seed"]
    )
    presses: dict[str, object] = {"full": None}
    for budget in [str(b) for b in budgets] if budgets else profile["budgets"]:
        presses[f"default@{budget}"] = ClusterAttnPress(budget=int(budget))
        presses[f"tuned@{budget}"] = ClusterAttnPress.from_profile(path, budget=int(budget))
    same = {n: next(m for m, p in presses.items() if p == press) for n, press in presses.items()}
    distinct = {
        n: p for n, p in presses.items() if same[n] == n
    }  # a tuned press equal to the default runs once
    rows = []
    for i in tqdm(indices, desc=f"held-out {Path(profile['task']).stem}", unit="sample"):
        s = samples[i]
        new_tokens = min(s.max_new_tokens, max_new_tokens or s.max_new_tokens)
        outputs = generate_many(
            model,
            tokenizer,
            s.context,
            s.question,
            presses=distinct,
            max_new_tokens=new_tokens,
            answer_prefix=s.answer_prefix,
        )
        rows.append(
            {
                "index": i,
                "answers": s.answers,
                **{
                    n: {"prediction": outputs[m].text, "score": score(s, outputs[m].text)}
                    for n, m in same.items()
                },
            }
        )
    summary = {name: sum(r[name]["score"] for r in rows) / max(1, len(rows)) for name in presses}
    profile["heldout"] = {"n": len(rows), "max_new_tokens": max_new_tokens, "accuracy": summary, "rows": rows}
    write_json(path, profile)
    return profile["heldout"]
