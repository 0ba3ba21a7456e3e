"""Time our compression step (scoring + selection + gather, all layers) on one essay prompt.

    .venv/bin/python benchmarks/compress_time.py --length 8192 --ids runs/ids-8192.pt

Writes the prompt's token ids to ``--ids`` (for ``kvpress_compress_time.py``, the same input in
kvpress's environment) and prints one JSON line per press: median compression seconds over repeats.
With ``--selection-budgets 128,512,1024`` it also records the window scores ClusterAttn sees in one
more prefill and times the selection step alone on them, DBAC vs plain top-k
(:func:`clusterattn.bench.selection_timing`, interleaved, medians), one JSON line per budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import clusterattn as ca
from clusterattn.bench import prompt_inputs, selection_markdown, selection_timing
from clusterattn.hf import new_cache
from clusterattn.steps import prefill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--selection-budgets", default="", help="e.g. 128,512,1024 (empty: skip)")
    parser.add_argument("--selection-repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ca.load_model("smollm2-135m")
    inputs = prompt_inputs(tokenizer, args.length, 1, "cpu")
    Path(args.ids).parent.mkdir(parents=True, exist_ok=True)
    torch.save(inputs.prompt_ids.clone(), args.ids)
    presses = (ca.SnapKVPress(budget=args.budget), ca.ClusterAttnPress(budget=args.budget))
    for press in presses if args.repeats > 0 else ():  # --repeats 0: the selection timing only
        seconds = []
        for _ in range(args.repeats):
            with torch.no_grad(), press(model) as session:
                prefill(model, inputs, new_cache(model))
            seconds.append(session.stats.seconds)
        print(json.dumps({"press": type(press).__name__, "length": args.length,
                          "compress_s": statistics.median(seconds)}))  # fmt: skip
    if args.selection_budgets:
        scores = {args.length: window_scores_seen(model, inputs, args.budget)}
        budgets = [int(b) for b in args.selection_budgets.split(",")]
        rows = selection_timing((args.length,), budgets, reps=args.selection_repeats, scores=scores)
        for row in rows:
            print(json.dumps({"selection": "real window scores", **row}))
        print("\n".join(selection_markdown(rows)))


def window_scores_seen(model, inputs, budget: int) -> torch.Tensor:
    """``(layers, batch, kv_heads, prefix)`` window scores ClusterAttn selects from in one prefill."""
    press, seen = ca.ClusterAttnPress(budget=budget), []
    select = press.select_prefix
    press.select_prefix = lambda scores, keep: select(seen.append(scores.clone()) or scores, keep)
    with torch.no_grad(), press(model):
        prefill(model, inputs, new_cache(model))
    return torch.stack(seen)


if __name__ == "__main__":
    main()
