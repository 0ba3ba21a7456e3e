"""Does a kept set that covers more decode-attention mass answer better? An ablation for
docs/analysis.md: per KV head, DBAC's spans or plain top-k of the same window scores.

``HeadChoicePress`` fits both selections on the *first half* of the observation window and keeps,
per KV head, the one that covers more of the *second half's* window attention (a check inside the
window, no profiling); ``mode="spans"`` is ClusterAttnPress's own selection and ``mode="topk"``
plain top-k. On traced samples the script measures each mode's prefix fitting rate against the
later decode steps (and the per-head hindsight best of spans and top-k, an upper bound for any
per-head choice between them); on further samples of the same tasks, each mode's accuracy.

    python benchmarks/mass_vs_spans.py --length 2048 --out docs/analysis/mass_vs_spans-2048.json
    python benchmarks/mass_vs_spans.py --report docs/analysis/mass_vs_spans-*.json \
        --doc docs/analysis/mass_vs_spans.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from clusterattn.dbac import topk_indices
from clusterattn.presses.base import check_choice
from clusterattn.presses.clusterattn import ClusterAttnPress
from clusterattn.scoring import window_scores

MODES = ("spans", "topk", "validated")
TASKS = ("niah_single_2", "niah_multikey_1", "vt", "qa_1")


@dataclass
class HeadChoicePress(ClusterAttnPress):
    """Ablation, not a recommended press: ``mode`` ``"spans"`` (DBAC, as ClusterAttnPress),
    ``"topk"`` (plain top-k of the same scores) or ``"validated"`` (per KV head, whichever of the two,
    fitted on the first ``w - w // 2`` window queries, covers more of the last ``w // 2`` queries'
    summed attention over the prefix). Shapes as every press: queries ``(batch, q_heads, seq, d)``,
    keys ``(batch, kv_heads, seq, d)``, kept indices ``(batch, kv_heads, budget)``."""

    mode: str = "validated"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("mode", self.mode, MODES)
        if self.window_size < 2:
            raise ValueError("the validated choice splits the window: window_size must be >= 2")

    def span_heads(self, query, key, scaling, budget: int, pad_mask=None) -> torch.Tensor:
        """``(batch, kv_heads)`` bool: heads whose spans fitted on the first half of the window
        cover more of the second half's attention mass than top-k fitted the same way."""
        if self.mode != "validated":
            return torch.full(key.shape[:2], self.mode == "spans", device=key.device)
        seq, w = key.shape[2], self.window_size
        half = w // 2
        agg = self.aggregation
        early_mask = None if pad_mask is None else pad_mask[:, : seq - half]
        early = window_scores(
            query[:, :, : seq - half],
            key[:, :, : seq - half],
            scaling,
            w - half,
            aggregation=agg,
            pad_mask=early_mask,
        )
        late = window_scores(query, key, scaling, half, aggregation=agg, pad_mask=pad_mask)[..., : seq - w]
        late = late.nan_to_num(0.0, neginf=0.0)
        total = late.sum(-1).clamp_min(1e-30)
        prefix = budget - w

        def covered(idx):
            return late.gather(-1, idx).sum(-1) / total

        return covered(self.select_prefix(early, prefix)) > covered(topk_indices(early, prefix))

    def select_indices(self, query, key, scaling, budget, *, layer, pad_mask):
        seq, w = key.shape[2], self.window_size
        scores = self.prefix_scores(query, key, scaling, layer=layer, pad_mask=pad_mask)
        spans = self.span_heads(query, key, scaling, budget, pad_mask)[..., None]
        keep = torch.where(spans, self.select_prefix(scores, budget - w), topk_indices(scores, budget - w))
        window = torch.arange(seq - w, seq, device=key.device)
        return torch.cat([keep, window.expand(*keep.shape[:-1], -1)], dim=-1)


def fitting(trace, budget: int) -> dict:
    """Prefix fitting rate of every mode on one trace, the per-head hindsight best of spans and top-k,
    and the share of KV heads the validated choice gives spans."""
    from clusterattn.analysis.metrics import fitting_rate, kept_mask

    layers, q_heads, _, seq = trace.attention.shape
    kv_heads, n = trace.keys.shape[1], seq - HeadChoicePress.window_size
    prefix = trace.attention[..., :n]
    masks = {
        mode: kept_mask(trace.select(HeadChoicePress(budget=budget, mode=mode)), seq)[..., :n]
        for mode in ("spans", "topk")
    }
    with torch.no_grad():  # (layers, kv_heads): the validated press's own choice, computed once
        heads = HeadChoicePress(budget=budget).span_heads(trace.queries, trace.keys, trace.scaling, budget)
    masks["validated"] = torch.where(heads[..., None], masks["spans"], masks["topk"])
    per_head = {}
    for mode, mask in masks.items():
        rate = fitting_rate(prefix, mask).mean(-1)  # (layers, q_heads)
        per_head[mode] = rate.view(layers, kv_heads, q_heads // kv_heads).mean(-1)
    out = {mode: float(r.mean()) for mode, r in per_head.items()}
    return out | {
        "hindsight": float(torch.maximum(per_head["spans"], per_head["topk"]).mean()),
        "span_heads": float(heads.float().mean()),
    }


def run(args) -> dict:
    import clusterattn as ca
    from clusterattn.analysis.data import load_samples, score
    from clusterattn.analysis.trace import EmptyAnswer, trace_decode
    from clusterattn.generation import generate_many

    model, tokenizer = ca.load_model(args.model)
    result = {"command": " ".join(shlex.quote(a) for a in sys.argv), "length": args.length, "tasks": {}}
    for task in args.tasks:
        samples = load_samples(
            task, args.length, args.trace_samples + args.eval_samples, tokenizer, seed=args.seed
        )
        fits = []
        for s in tqdm(samples[: args.trace_samples], desc=f"trace {task}", unit="sample"):
            try:
                trace = trace_decode(model, tokenizer, s.context, s.question, answer_prefix=s.answer_prefix)
            except EmptyAnswer:
                continue
            fits.append({str(b): fitting(trace, b) for b in args.budgets})
        presses = {f"{m}@{b}": HeadChoicePress(budget=b, mode=m) for b in args.budgets for m in MODES}
        scores = {name: [] for name in presses}
        for s in tqdm(samples[args.trace_samples :], desc=f"answer {task}", unit="sample"):
            outs = generate_many(
                model,
                tokenizer,
                s.context,
                s.question,
                presses=presses,
                max_new_tokens=min(s.max_new_tokens, args.max_new_tokens),
                answer_prefix=s.answer_prefix,
            )
            for name in presses:
                scores[name].append(score(s, outs[name].text))
        result["tasks"][task] = {"fitting": fits, "accuracy": scores}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # after every task: resumable by eye
    return result


def _mean(xs) -> float:
    return 100 * sum(xs) / len(xs) if xs else float("nan")


def report(paths: list[str], doc: str) -> str:
    """Markdown tables of the result JSONs: fitting rate per budget and mode, accuracy per task."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["length"])
    fit_rows, acc_rows, commands = [], [], []
    for r in runs:
        commands.append(f"`python {r['command']}`")
        budgets = sorted({b for t in r["tasks"].values() for f in t["fitting"] for b in f}, key=int)
        for b in budgets:
            cells = [f[b] for t in r["tasks"].values() for f in t["fitting"]]
            fit_rows.append(
                [str(r["length"]), b, str(len(cells))]
                + [f"{_mean([c[k] for c in cells]):.1f}" for k in (*MODES, "hindsight", "span_heads")]
            )
            for task, t in r["tasks"].items():
                acc = t["accuracy"]
                acc_rows.append(
                    [str(r["length"]), b, task, str(len(acc[f"spans@{b}"]))]
                    + [f"{_mean(acc[f'{m}@{b}']):.1f}" for m in MODES]
                )
    table = lambda head, rows: "\n".join(  # noqa: E731
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        + ["| " + " | ".join(x) + " |" for x in rows]
    )
    text = "\n".join(
        [
            "# Decode-attention mass against answers: spans, top-k, and a per-head choice",
            "",
            "SmolLM2-135M-Instruct, query-aware RULER samples, budget B per KV head (window of 32 included). "
            "Modes: `spans` = ClusterAttn's DBAC; `topk` = plain top-k of the same window scores; "
            "`validated` = per KV head, whichever of the two, fitted on the first 16 window queries, "
            "covers more of the last 16 queries' attention. `hindsight` = per KV head the better of "
            "spans and top-k on the decode attention itself (an upper bound for any such choice). "
            "Produced by `benchmarks/mass_vs_spans.py`: " + "; ".join(commands) + ".",
            "",
            "Prefix fitting rate (% of the later decode steps' attention on the prefix that the kept set "
            "holds), mean over traced samples, and the share (%) of KV heads given spans by `validated`:",
            "",
            table(["length", "B", "traces", *MODES, "hindsight", "% heads with spans"], fit_rows),
            "",
            "Accuracy (%, the task's RULER metric, greedy) on further samples of the same tasks:",
            "",
            table(["length", "B", "task", "n", *MODES], acc_rows),
            "",
        ]
    )
    Path(doc).write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--trace-samples", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="result JSON to write")
    parser.add_argument("--report", nargs="+", help="result JSONs to tabulate (no model run)")
    parser.add_argument("--doc", help="markdown file for --report")
    args = parser.parse_args(argv)
    if args.report:
        if not args.doc:
            parser.error("--report needs --doc")
        print(report(args.report, args.doc))
        return 0
    if not args.out:
        parser.error("--out is required unless --report is given")
    if args.threads:
        torch.set_num_threads(args.threads)
    from clusterattn.analysis.data import check_task

    for task in args.tasks:
        check_task(task)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
