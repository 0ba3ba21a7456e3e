"""Fidelity of long generations under decode-phase compression (``DecodingPress``), against the
full cache's own output.

For each prompt, the full cache first writes the reference: ``--new-tokens`` greedy tokens. Then,
per press and decode budget:

- **common prefix**: the compressed run writes freely; how many of its first tokens equal the
  reference's;
- **teacher-forced top-1 agreement** and **mean log-probability**: the reference tokens are fed one
  at a time into the compressed cache (which evicts as it goes, exactly as when it writes freely),
  and each step's argmax is compared with the next reference token, whose log-probability is
  averaged. One early divergence ends the common prefix; these two say how close the policy stays
  over the whole output.

Prompts: summaries of consecutive RULER essay excerpts (``--prompt-tokens`` each), asked to go on
at length. SmolLM2 by default; the Qwen models by name.

    .venv/bin/python benchmarks/long_output_fidelity.py --prompts 3 --new-tokens 512 \\
        --presses clusterattn snapkv streamingllm --budgets 256 --out runs/long-output
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import clusterattn as ca
from clusterattn.hf import cache_kwarg, new_cache
from clusterattn.presses import PRESSES


@torch.no_grad()
def reference(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens ``(new_tokens,)`` of the full cache after ``prompt`` ``(1, L)``."""
    return _free_run(model, prompt, new_cache(model), new_tokens)


def _free_run(model, prompt, cache, new_tokens: int) -> torch.Tensor:
    name, tokens = cache_kwarg(model), []
    logits = model(prompt, **{name: cache}).logits[:, -1]
    for step in range(new_tokens):
        token = logits.argmax(-1)
        tokens.append(int(token))
        if step < new_tokens - 1:
            logits = model(token[:, None], **{name: cache}).logits[:, -1]
    return torch.tensor(tokens)


@torch.no_grad()
def fidelity(model, prompt: torch.Tensor, target: torch.Tensor, press) -> dict:
    """The three measures of the module docstring for ``press`` (a fresh cache per pass)."""
    free = _free_run(model, prompt, ca.CompressedCache(model, press), len(target))
    differs = (free != target).nonzero()
    prefix = int(differs[0]) if len(differs) else len(target)
    name, cache = cache_kwarg(model), ca.CompressedCache(model, press)
    logits = model(prompt, **{name: cache}).logits[:, -1]
    hits, logprobs = 0, []
    for step, token in enumerate(target.tolist()):
        hits += int(logits.argmax(-1)) == token
        logprobs.append(float(torch.log_softmax(logits.float(), -1)[0, token]))
        if step < len(target) - 1:
            logits = model(torch.tensor([[token]]), **{name: cache}).logits[:, -1]
    held = max(layer.keys.shape[2] for layer in cache.layers)
    return {
        "common_prefix": prefix, "top1_agreement": hits / len(target),
        "mean_logprob": statistics.fmean(logprobs), "held_tokens": held,
        "decode_compressions": cache.stats.decode_compressions,
    }  # fmt: skip


def essay_prompts(tokenizer, count: int, tokens: int) -> list[torch.Tensor]:
    """``count`` chat prompts asking for a long summary of consecutive ``tokens``-token essay excerpts."""
    from clusterattn.eval.niah import load_essays

    ids = tokenizer(load_essays(), add_special_tokens=False)["input_ids"]
    prompts = []
    for i in range(count):
        excerpt = tokenizer.decode(ids[i * tokens : (i + 1) * tokens])
        messages = [{"role": "user", "content": f"{excerpt}\n\nSummarize this essay in detail, point by "
                     "point, then discuss each point at length."}]  # fmt: skip
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
    return prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="registry name or path")
    parser.add_argument("--prompts", type=int, default=3, help="essay prompts")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="essay tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens of each generation")
    parser.add_argument("--presses", nargs="+", default=["clusterattn", "snapkv", "streamingllm"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256], help="decode budgets")
    parser.add_argument("--interval", type=int, default=128, help="tokens between re-selections")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="runs/long-output", help="folder for results.json")
    args = parser.parse_args(argv)
    for name in args.presses:  # bad names or budgets fail before the model loads
        for budget in args.budgets:
            ca.DecodingPress(PRESSES[name](budget=budget), budget=budget, interval=args.interval)
    torch.set_num_threads(args.threads)
    model, tokenizer = ca.load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for p, prompt in enumerate(essay_prompts(tokenizer, args.prompts, args.prompt_tokens)):
        target = reference(model, prompt, args.new_tokens)
        for name in args.presses:
            for budget in args.budgets:
                press = ca.DecodingPress(PRESSES[name](budget=budget), budget=budget, interval=args.interval)
                row = {"prompt": p, "prompt_tokens": prompt.shape[1], "press": name, "budget": budget}
                rows.append(row | fidelity(model, prompt, target, press))
                print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s\n")
    print("| press | decode budget | common prefix | top-1 agreement | mean log-prob |")
    print("|---|---|---|---|---|")
    for name in args.presses:
        for budget in args.budgets:
            group = [r for r in rows if r["press"] == name and r["budget"] == budget]
            print(
                f"| {name} | {budget} | {statistics.fmean(r['common_prefix'] for r in group):.0f} "
                f"| {100 * statistics.fmean(r['top1_agreement'] for r in group):.1f} % "
                f"| {statistics.fmean(r['mean_logprob'] for r in group):.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
