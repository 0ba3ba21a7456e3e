"""Which presses keep the needle: the share of each RULER needle's tokens a selection keeps.

    .venv/bin/python benchmarks/needle_coverage.py --model qwen2.5-coder-0.5b --length 8192 --seed 1 \
        --tasks niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 \
        --budgets 0.875 0.9375 0.96875 --setting query_agnostic \
        --presses clusterattn clusterattn:scorer=leverage --out runs/needle-coverage

One prefill per prompt records every layer's post-RoPE queries and keys
(:func:`clusterattn.steps.record_prefill`, the evaluation grid's shared prefill); each press then
selects from them exactly as it does inside a model (``press.select``), and the needles' tokens are
looked up in what it keeps. Three shares per press, budget and prompt, each averaged over layers and KV
heads: of the answer values' tokens kept (``value``), of the (layer, head) pairs that keep every
value token (``whole``: a number cut in half is a wrong answer), and of the needle sentences' tokens
kept (``sentence``: the key that the question names sits there). A proxy for accuracy that costs
one prefill per prompt and no decoding, for choosing a press's parameters on prompts that the
reported grid does not use (``--seed 1``: the grid uses seed 0). Prints a markdown table (the
``whole`` share per task and the three means) and writes ``coverage.json`` (with the arguments and
the commit) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import clusterattn as ca
from clusterattn.eval.ruler import load_ruler_samples
from clusterattn.eval.runner import _git_commit
from clusterattn.eval.spec import budget_label, parse_budget, parse_press
from clusterattn.replay import PrefillRecord
from clusterattn.steps import build_prompt, prepare_inputs, record_prefill


def needle_tokens(tokenizer, sample, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """Token positions of the answer values and of the sentences holding them in the context part
    (the prompt's first tokens, as :func:`clusterattn.steps.prepare_inputs` tokenises it)."""
    head, _ = build_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix, True)
    encoded = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] != prompt_ids[: len(encoded["input_ids"])]:
        raise RuntimeError(f"{sample.task}: the context's tokens are not the prompt's first tokens")
    offsets = encoded["offset_mapping"]
    values, sentences = set(), set()
    for answer in sample.answers:
        start = head.find(answer)
        if start < 0:
            raise ValueError(f"{sample.task}: answer {answer!r} is not in the context")
        end = start + len(answer)
        first = max(head.rfind(".", 0, start), head.rfind("\n", 0, start)) + 1
        last = head.find(".", end)
        last = len(head) if last < 0 else last
        values |= {i for i, (a, b) in enumerate(offsets) if b > start and a < end}
        sentences |= {i for i, (a, b) in enumerate(offsets) if b > first and a < last}
    return sorted(values), sorted(sentences)


def coverage(press, record: PrefillRecord, values: torch.Tensor, sentences: torch.Tensor) -> list[float]:
    """``[value, whole, sentence]`` shares averaged over layers and KV heads, ``press`` selecting from
    the recorded prefill's queries and full keys as it would inside the model."""
    shares = []
    for rank, layer_idx in enumerate(record.layers):
        query, key = record.queries[rank], record.cache.layers[layer_idx].keys
        idx = (
            None
            if press is None
            else press.select(
                query,
                key,
                record.scaling[rank],
                layer=rank,
                n_layers=len(record.layers),
                pad_mask=record.pad_mask,
                inv_freq=None if record.inv_freq is None else record.inv_freq[layer_idx],
            )
        )
        keep = torch.ones(*key.shape[:2], key.shape[2], dtype=torch.bool)
        if idx is not None:
            keep = torch.zeros_like(keep).scatter_(-1, idx, True)
        shares.append(
            [
                keep[..., values].float().mean().item(),
                keep[..., values].all(dim=-1).float().mean().item(),
                keep[..., sentences].float().mean().item(),
            ]
        )
    return torch.tensor(shares).mean(dim=0).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name (default: %(default)s)")
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="RULER seed; grid: 0 (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", required=True, help="niah_* tasks, one prompt each")
    parser.add_argument("--budgets", nargs="+", required=True, help="token counts or compression ratios")
    parser.add_argument(
        "--setting", choices=("query_aware", "query_agnostic"), default="query_agnostic",
        help="compress with or without the question (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--presses", nargs="+", required=True, help="this library's press specs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for coverage.json")
    args = parser.parse_args()
    if not all(task.startswith("niah_") for task in args.tasks):
        parser.error("--tasks takes needle tasks (niah_*) only: other tasks have no needle to find")
    specs = [parse_press(text) for text in args.presses]
    if any(spec.is_peer for spec in specs):
        parser.error("--presses takes this library's presses only (kvpress's run in another environment)")
    budgets = [parse_budget(text) for text in args.budgets]
    torch.set_num_threads(args.threads)
    model, tokenizer = ca.load_model(args.model)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for task in tqdm(args.tasks, desc="prompts", unit="prompt"):
        sample = load_ruler_samples(task, args.length, 1, tokenizer, seed=args.seed)[0]
        inputs = prepare_inputs(
            model, tokenizer, sample.context, sample.question, max_new_tokens=1,
            query_aware=args.setting == "query_aware", answer_prefix=sample.answer_prefix,
        )  # fmt: skip
        found = needle_tokens(tokenizer, sample, inputs.prompt_ids[0].tolist())
        values, sentences = (torch.tensor(t) for t in found)
        with torch.no_grad():
            record, _ = record_prefill(model, inputs)
            for spec in specs:
                for budget in [None] if spec.is_full else budgets:
                    row = results.setdefault(spec.label, {}).setdefault(budget_label(budget), {})
                    row[task] = coverage(spec.build(budget), record, values, sentences)
        del record
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "commit": _git_commit(), "coverage": results}
    (out / "coverage.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| press | budget | " + " | ".join(args.tasks) + " | value / whole / sentence |")
    print("|---" * (len(args.tasks) + 3) + "|")
    for label, by_budget in results.items():
        for budget, by_task in by_budget.items():
            mean = torch.tensor([by_task[t] for t in args.tasks]).mean(dim=0).tolist()
            cells = " | ".join(f"{by_task[t][1]:.2f}" for t in args.tasks)
            print(f"| {label} | {budget} | {cells} | {mean[0]:.2f} / {mean[1]:.2f} / {mean[2]:.2f} |")


if __name__ == "__main__":
    main()
