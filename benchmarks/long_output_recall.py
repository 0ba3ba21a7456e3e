"""Recall after a long output: does a needle of the prompt survive decode-phase eviction while the
model writes a long preamble first?

Per sample (RULER ``niah_single_2``: a 7-digit value under a key, hidden at depths spread over
``--context`` tokens of essays), a two-turn chat: the first user turn holds the document and asks
for a detailed outline of it; the assistant writes the outline (the preamble); the second user turn
asks the needle's question. Then:

1. the full cache writes the preamble: ``--preamble`` greedy tokens (end-of-text suppressed; all
   samples in one left-padded batch);
2. each press and decode budget prefills the first turn (compressed to the budget by the same
   rule; kvpress: its ``PrefillDecodingPress``; ``--keep-prompt``: kept whole, as kvpress's
   ``DecodingPress`` does), reads the same preamble, the end of that turn, the question's turn and
   RULER's answer prefix under its own eviction policy (fed in chunks that end at its eviction
   points, as in ``long_output_fidelity.py``), and writes ``--answer-tokens`` greedy tokens, which
   are scored with RULER's string match;
3. the full cache does the same, so a sample it gets wrong is marked.

Every policy reads the same preamble, so the needle's distance and what happens to it depend on the
policy alone. The preamble is written from a first turn without the question because a small
model asked for "an outline first, then the answer" in one turn answers at once
(Qwen2.5-Coder-0.5B opened all ten preambles of a first run with the value) and, with digits
suppressed, writes the question's words and then blanks. A preamble that states the value makes
the sample trivial, so by default the assistant's turn starts with ``--preamble-start`` (an
outline's first bullet) and the preamble is written with every token that contains a digit
suppressed (``--allow-digits`` lifts that): the value can then come only from the prompt, after
the evictions. Samples whose preamble still states the value are counted apart.

``--question-in-prompt`` puts the question in the first turn too (answer it only after the
outline), and the answer prefix follows the preamble directly: the form where a press's first
eviction can still see the question. The preamble stays the outline written without the question.

Run in the peers environment (kvpress 0.5.5), resumable:

    PYTHONPATH=src .venv-peers/bin/python benchmarks/long_output_recall.py \\
        --model qwen2.5-coder-0.5b --samples 10 --budgets 512 1024 --keep-prompt --question-in-prompt \\
        --out runs/long-output-recall
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

import clusterattn as ca
from clusterattn.eval.niah import make_needle_samples, score_answer
from long_output_fidelity import Policy, check_presses, end_tokens, references
from long_output_report import _append, _publish, _rows

INSTRUCTION = "Write a detailed outline of the document above, point by point, with at least thirty points."
QUESTION_LAST = " Only after the outline, answer this question: {question}"


def needle_prompts(tokenizer, samples: list, start: str = "", question: bool = False):
    """``(sample, prompt ids (L,))`` pairs for ``samples`` (:func:`make_needle_samples`): the first
    user turn (the document, then the outline instruction, with ``question``: and the needle's
    question to answer after the outline), then ``start`` as the beginning of the assistant's turn."""
    out = []
    for sample in samples:
        ask = QUESTION_LAST.format(question=sample.question) if question else ""
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{sample.context}\n\n{INSTRUCTION}{ask}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(chat + start, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        out.append((sample, ids))
    return out


def question_turn(tokenizer, question: str, answer_prefix: str) -> list[int]:
    """Ids that close the assistant's turn, ask ``question`` in a new user turn and open the
    assistant's answer with ``answer_prefix``, as the chat template writes them."""
    mark = "\u2063PREAMBLE\u2063"  # stands for the preamble; the template's text after it is the cue
    chat = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "document"},
            {"role": "assistant", "content": mark},
            {"role": "user", "content": question},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    if mark not in chat:
        raise ValueError("the chat template does not keep the assistant's turn verbatim")
    return tokenizer(chat.split(mark, 1)[1] + answer_prefix, add_special_tokens=False)["input_ids"]


def digit_tokens(tokenizer) -> list[int]:
    """Ids of every vocabulary token whose text contains an ASCII digit."""
    return sorted(i for token, i in tokenizer.get_vocab().items() if any(c in "0123456789" for c in token))


@torch.no_grad()
def answer_after(model, prompt, forced, policy: Policy, answer_tokens: int, stop: list[int]) -> list[int]:
    """Greedy tokens after ``prompt`` ``(L,)`` and the ``forced`` tokens ``(n,)`` under ``policy``
    (evicting as it goes); stops at a ``stop`` token."""
    try:
        last, done = policy.prefill(prompt), 0
        while done < len(forced):
            n = min(policy.room(), len(forced) - done)
            last = policy.feed(forced[done : done + n])[-1]
            done += n
        answer = []
        while len(answer) < answer_tokens and int(last.argmax()) not in stop:
            answer.append(int(last.argmax()))
            if len(answer) < answer_tokens:
                last = policy.feed(torch.tensor(answer[-1:]))[-1]
        return answer
    finally:
        policy.close()


def leading_digits(answer: str, value: str) -> int:
    """How many of ``value``'s first digits the answer's first number gets right, in order."""
    digits = re.match(r"\s*(\d*)", answer).group(1)
    return next(
        (i for i, (a, b) in enumerate(zip(digits, value, strict=False)) if a != b),
        min(len(digits), len(value)),
    )


def table(rows: list[dict], presses: list[str], budgets: list[int]) -> str:
    """Markdown: recall per press and budget over the samples the full cache answers, and the mean
    number of the value's leading digits the answer gets right (partial recall)."""
    valid = {r["sample"] for r in rows if r["press"] == "full" and r["correct"] and not r["in_preamble"]}
    lines = [
        f"Samples the full cache answers, its preamble not stating the value: {len(valid)}",
        "",
        "| press | decode budget | recall | leading digits right (mean) | tokens held (mean / peak) |",
        "|---|---|---|---|---|",
    ]
    for press in presses:
        for budget in [0] if press == "full" else budgets:
            group = [
                r for r in rows if r["press"] == press and r["budget"] == budget and r["sample"] in valid
            ]
            if group:
                recall = sum(r["correct"] for r in group)
                held = statistics.fmean(r["mean_held"] for r in group)
                digits = statistics.fmean(leading_digits(r["answer"], r["value"]) for r in group)
                lines.append(
                    f"| {press} | {budget or '-'} | {recall}/{len(group)} "
                    f"| {digits:.1f} of {len(group[0]['value'])} "
                    f"| {held:.0f} / {max(r['peak_held'] for r in group)} |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default="qwen2.5-coder-0.5b", help="registry name or path (default: %(default)s)")
    add("--samples", type=int, default=10, help="needle samples, depths 0.1..0.9 (default: %(default)s)")
    add("--context", type=int, default=2048, help="document tokens with the needle (default: %(default)s)")
    add("--preamble", type=int, default=1024, help="tokens the model writes first (default: %(default)s)")
    add("--answer-tokens", type=int, default=16, help="tokens of the answer (default: %(default)s)")
    add("--preamble-start", default="Outline of the document:\n\n-", help="text that opens the assistant's "
        "turn, part of the prompt ('' for none; default: %(default)r)")  # fmt: skip
    add("--question-in-prompt", action="store_true", help="put the needle's question in the first turn "
        "(to be answered after the outline) and cue the answer right after the preamble; the preamble is "
        "still the one written without the question (default: the question in a second turn)")  # fmt: skip
    add("--allow-digits", action="store_true", help="let the preamble contain digits (default: every "
        "token with a digit is suppressed in the preamble, so it cannot state the value)")  # fmt: skip
    add("--presses", nargs="+", default=["full", "clusterattn", "clusterattn+protect", "kvpress-snapkv",
        "kvpress-expectedattention", "streamingllm"], help="as in long_output_fidelity.py; a name of "
        "this library's press with '+protect' (e.g. clusterattn+protect) compresses the prompt to half "
        "the decode budget and keeps it, evicting generated tokens only (default: %(default)s)")  # fmt: skip
    add("--budgets", type=int, nargs="+", default=[256, 512, 1024], help="decode budgets (default: "
        "%(default)s)")  # fmt: skip
    add("--interval", type=int, default=128, help="tokens between evictions (default: %(default)s)")
    add("--keep-prompt", action="store_true", help="keep the whole prompt at prefill (default: compress it "
        "to the budget with the same rule; kvpress: PrefillDecodingPress)")  # fmt: skip
    add("--seed", type=int, default=0, help="needle keys, values and depths (default: %(default)s)")
    add("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    add(
        "--out",
        default="runs/long-output-recall",
        help="folder for the resumable results (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    check_presses(parser, args.presses, args.budgets, args.interval)
    torch.set_num_threads(args.threads)
    model, tokenizer = ca.load_model(args.model)
    banned = end_tokens(tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (out / "run.json").write_text(json.dumps({"args": vars(args), "commit": commit}, indent=1))
    samples = make_needle_samples(tokenizer, args.context, args.samples, seed=args.seed)
    outlines = needle_prompts(tokenizer, samples, args.preamble_start)
    prompts = outlines
    if args.question_in_prompt:
        prompts = needle_prompts(tokenizer, samples, args.preamble_start, question=True)
    pre_path, res_path = out / "preambles.jsonl", out / "results.jsonl"
    key = {"preamble": args.preamble, "start": args.preamble_start, "digits": args.allow_digits}
    preambles = {
        r["sample"]: r["tokens"] for r in _rows(pre_path) if all(r.get(k) == v for k, v in key.items())
    }
    if len(preambles) < len(prompts):
        start = time.perf_counter()
        quiet = banned if args.allow_digits else sorted(set(banned) | set(digit_tokens(tokenizer)))
        tokens = references(model, [p for _, p in outlines], args.preamble, quiet)
        for i, row in enumerate(tokens):
            preambles[i] = row.tolist()
            _append(pre_path, {"sample": i, **key, "tokens": preambles[i]})
        print(f"preambles: {time.perf_counter() - start:.0f} s", flush=True)
    rows = _rows(res_path)
    done = {(r["sample"], r["press"], r["budget"]) for r in rows}
    jobs = [("full", 0)] + [
        (p, b) for b in sorted(args.budgets, reverse=True) for p in args.presses if p != "full"
    ]
    for (press, budget), (i, (sample, prompt)) in itertools.product(jobs, enumerate(prompts)):
        if (i, press, budget) in done:
            continue
        if args.question_in_prompt:
            cue = tokenizer(f"\n\n{sample.answer_prefix}", add_special_tokens=False)["input_ids"]
        else:
            cue = question_turn(tokenizer, sample.question, sample.answer_prefix)
        forced = torch.tensor(preambles[i] + cue)
        start = time.perf_counter()
        whole = len(prompt) + len(forced) + args.answer_tokens
        policy = Policy(model, press, budget or whole, args.interval, compress_prompt=not args.keep_prompt)
        answer = tokenizer.decode(answer_after(model, prompt, forced, policy, args.answer_tokens, banned))
        row = {
            "sample": i, "depth": sample.depth, "press": press, "budget": budget,
            "prompt_tokens": len(prompt),
            "answer": answer, "value": sample.answer, "correct": score_answer(answer, sample.answer),
            "in_preamble": sample.answer in tokenizer.decode(preambles[i]),
            "mean_held": round(policy.mean_held), "peak_held": policy.peak,
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        rows.append(row)
        _append(res_path, row)
        print(json.dumps(row), flush=True)
    return _publish(out, table(rows, args.presses, args.budgets))


if __name__ == "__main__":
    raise SystemExit(main())
