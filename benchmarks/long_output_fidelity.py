"""Fidelity of long generations under decode-phase compression, against the full cache's own output:
this library's ``DecodingPress`` around its presses, kvpress 0.5.5's ``DecodingPress`` around its
SnapKV and ExpectedAttention, and StreamingLLM, at equal decode budgets.

For each prompt the full cache first writes the reference: ``--new-tokens`` greedy tokens (end-of-text
tokens suppressed, so every reference has that length; prompts are left-padded into one batch).
Then, per press and decode budget, the reference is fed back into a fresh cache under the press's
policy (teacher forcing) and three measures are read from the logits:

- **common prefix**: tokens before the first position whose argmax differs from the reference.
  Up to that position the compressed run has seen exactly the reference's tokens, so it is where a
  free greedy run under the same policy leaves the reference;
- **top-1 agreement**: the share of positions whose argmax is the reference token (and the same
  share counted only after the first eviction, where the policy starts to matter);
- **mean log-probability** of the reference tokens.

Every policy here evicts at fixed points (this library: when a layer holds ``budget + interval``
tokens; kvpress: after every ``interval`` decoding steps), so the reference is fed in chunks that end
exactly at those points: one forward per chunk instead of one per token, the same cache after each
eviction and the same logits up to rounding. ``--check`` compares that with one-token steps.

By default the prompt itself is not compressed (``compress_prompt=False``): kvpress's DecodingPress
works during decoding only, so both start from the whole prompt and are compared on decoding alone.
``--compress-prompt`` compresses it to the budget at prefill with the same rule (kvpress: its
``PrefillDecodingPress``), so the cache never holds more than ``budget + interval`` tokens.

Run in the peers environment (kvpress 0.5.5; see ``make peers``); the results are resumable:

    PYTHONPATH=src .venv-peers/bin/python benchmarks/long_output_fidelity.py \\
        --model qwen2.5-coder-0.5b --new-tokens 2048 --budgets 256 512 1024 --out runs/long-output

It writes ``table.md``; ``.venv/bin/python benchmarks/long_output_report.py runs/long-output`` draws
the figure too (``long_output_report.py``: the results' files, tables and figure).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import clusterattn as ca
from clusterattn.hf import cache_kwarg, masked_gqa, new_cache
from clusterattn.presses import PRESSES

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from long_output_report import _append, _publish, _rows, report  # noqa: E402

SPECS = [
    "an LRU cache class with O(1) get and put, per-entry time-to-live and hit/miss statistics",
    "a command-line todo manager that stores tasks in SQLite, with add, list, done and delete commands",
    "a rate limiter with token-bucket and sliding-window strategies, safe to use from several threads",
    "a Markdown-to-HTML converter for headings, nested lists, emphasis, links and fenced code blocks",
    "a JSON schema validator for types, required fields, enums, nested objects and arrays",
    "an event bus with subscribe and unsubscribe, wildcard topics, handler priorities and async handlers",
    "an HTTP client wrapper with retries, exponential backoff with jitter, timeouts and a circuit breaker",
    "a pure-Python matrix class with addition, multiplication, transpose, determinant and inverse",
    "a tokenizer and recursive-descent parser for arithmetic expressions with variables and functions",
    "a directory watcher that polls a file tree and reports created, modified and deleted files",
    "a bank ledger with deposits, withdrawals, transfers, overdraft rules and monthly statements",
    "a task scheduler with priorities, dependencies between tasks, cycle detection and worker threads",
    "a CSV cleaning pipeline with type inference, missing values, deduplication and an outlier report",
    "a key-value store with a write-ahead log, periodic snapshots and crash recovery",
]
SPEC_REQUEST = (
    "Write a complete, well-documented Python module that implements {spec}. First explain the design "
    "in detail, then give the code with docstrings, type hints and error handling, then example usage, "
    "then a full set of unit tests."
)
ESSAY_REQUEST = "Summarize this essay in detail, point by point, then discuss each point at length."
KVPRESS = {"kvpress-snapkv": "SnapKVPress", "kvpress-expectedattention": "ExpectedAttentionPress"}
MAX_CHUNK = 256  # tokens per forward between evictions (bounds the chunk's logits)
PROTECT = "+protect"  # suffix of a press name: DecodingPress(press(budget // 2), budget, protect_prompt=True)


def chat_prompts(tokenizer, essays: int, essay_tokens: int) -> list[tuple[str, torch.Tensor]]:
    """``(name, ids (L,))`` for every coding spec and ``essays`` summaries of consecutive excerpts."""
    from clusterattn.eval.niah import load_essays

    texts = [(f"spec-{i:02d}", SPEC_REQUEST.format(spec=spec)) for i, spec in enumerate(SPECS)]
    ids = tokenizer(load_essays(), add_special_tokens=False)["input_ids"]
    for i in range(essays):
        excerpt = tokenizer.decode(ids[i * essay_tokens : (i + 1) * essay_tokens])
        texts.append((f"essay-{i:02d}", f"{excerpt}\n\n{ESSAY_REQUEST}"))
    out = []
    for name, text in texts:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        out.append((name, tokenizer(chat, return_tensors="pt", add_special_tokens=False)["input_ids"][0]))
    return out


def end_tokens(tokenizer) -> list[int]:
    """Token ids that end a reply (suppressed, so every generation has the requested length)."""
    ids = {tokenizer.eos_token_id} | {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")
    }
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


def _next_logits(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    logits = logits.float()
    logits[..., banned] = float("-inf")
    return logits


@torch.no_grad()
def references(model, prompts: list[torch.Tensor], new_tokens: int, banned: list[int]) -> torch.Tensor:
    """Greedy ``(batch, new_tokens)`` of the full cache for ``prompts`` (1-D ids), left-padded into
    one batch; ``banned`` tokens are never chosen."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    name, cache, out = cache_kwarg(model), new_cache(model), []
    with masked_gqa():  # a padded batch's mask would copy every KV head per query head, every step
        logits = model(ids, attention_mask=mask, position_ids=position, logits_to_keep=1, **{name: cache})
        logits = logits.logits
        for step in range(new_tokens):
            token = _next_logits(logits[:, -1], banned).argmax(-1)
            out.append(token)
            if step < new_tokens - 1:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position[:, -1:] + 1
                kwargs = {"attention_mask": mask, "position_ids": position, name: cache}
                logits = model(token[:, None], **kwargs).logits
    return torch.stack(out, dim=1)


def decoding_press(name: str, budget: int, interval: int, compress_prompt: bool = False) -> ca.DecodingPress:
    """This library's ``DecodingPress`` for a press name of :data:`clusterattn.PRESSES`; with the
    :data:`PROTECT` suffix, the prompt compressed to half the budget and kept (generated tokens are
    the only ones re-selected). KeyError for an unknown name; the presses' own errors for a bad
    budget or interval."""
    if name.endswith(PROTECT):
        rule = PRESSES[name.removesuffix(PROTECT)](budget=budget // 2)
        return ca.DecodingPress(rule, budget, interval=interval, protect_prompt=True)
    rule = PRESSES[name](budget=budget)
    return ca.DecodingPress(rule, budget, interval=interval, compress_prompt=compress_prompt)


def check_presses(
    parser: argparse.ArgumentParser, presses: list[str], budgets: list[int], interval: int
) -> None:
    """Fail before the model loads: an unknown press name (``parser.error``), or a budget or interval
    that one of this library's presses refuses (its own ``ValueError``)."""
    for name in presses:
        if name in KVPRESS or name == "full":
            continue
        for budget in budgets:
            try:
                decoding_press(name, budget, interval)
            except KeyError:
                parser.error(f"unknown press {name!r}")


class Policy:
    """One press at one decode budget, driven over one prompt: :meth:`prefill`, then :meth:`feed`
    chunks that end at or before the next eviction point (:meth:`room`); :meth:`close` at the end."""

    def __init__(self, model, name: str, budget: int, interval: int, compress_prompt: bool = False):
        self.model, self.name, self.budget, self.interval = model, name, budget, interval
        self.kv_press, self.press, self.stack = None, None, contextlib.ExitStack()
        self.compress_prompt = (compress_prompt or name.endswith(PROTECT)) and name != "full"
        if name in KVPRESS:
            import kvpress

            if interval > budget:  # kvpress also evicts after any forward of ``budget`` tokens or more
                raise ValueError(f"{name}: the interval ({interval}) must not exceed the budget ({budget})")
            inner = getattr(kvpress, KVPRESS[name])()
            self.kv_press = kvpress.DecodingPress(
                base_press=inner, compression_interval=interval, target_size=budget
            )
        elif name != "full":
            self.press = decoding_press(name, budget, interval, compress_prompt)

    def prefill(self, prompt: torch.Tensor, steps: bool = False) -> torch.Tensor:
        """Logits ``(vocab,)`` after the prompt ``(L,)``. ``steps``: later tokens come one at a time
        (kvpress then counts its own interval; in chunks it evicts after every chunk)."""
        self.position, self.fed, self.held_sum, self.peak = len(prompt), 0, 0, len(prompt)
        self.cache = (
            new_cache(self.model) if self.press is None else ca.CompressedCache(self.model, self.press)
        )
        if self.kv_press is not None:
            self.kv_press.compression_interval = self.interval if steps else 1
            press = self.kv_press
            if self.compress_prompt:  # kvpress's own prefill-then-decode composition, same rule
                import kvpress

                from clusterattn.eval.peer_presses import kvpress_ratio

                ratio = kvpress_ratio(self.name, self.budget, len(prompt), 0)
                first = getattr(kvpress, KVPRESS[self.name])(compression_ratio=ratio)
                press = kvpress.PrefillDecodingPress(prefilling_press=first, decoding_press=self.kv_press)
            self.stack.enter_context(press(self.model))  # its buffers live until close()
        return self._forward(prompt[None], torch.arange(len(prompt)))[0, -1]

    def room(self) -> int:
        """Tokens that may be fed before the next eviction point (the point included)."""
        if self.kv_press is not None:
            return self.interval - self.fed % self.interval
        if self.press is None:
            return MAX_CHUNK
        return min(MAX_CHUNK, max(1, self.budget + self.interval - self.held()))

    def feed(self, tokens: torch.Tensor, steps: bool = False) -> torch.Tensor:
        """Logits ``(n, vocab)`` after each of ``tokens`` ``(n,)`` (at most :meth:`room`; fewer only
        at the end of the text). ``steps`` feeds them one at a time: the reference path."""
        if steps and len(tokens) > 1:
            return torch.cat([self.feed(t[None], steps=True) for t in tokens])
        if self.kv_press is not None and not steps:
            # kvpress evicts inside the forward of its interval's last step and scores with that
            # forward's inputs (SnapKV rotates its window's queries with that forward's positions):
            # the chunk's last token goes alone, the rest of the chunk before it without eviction
            evicts = len(tokens) == self.room()
            if len(tokens) == 1:
                return self._chunk(tokens, evict=evicts)
            return torch.cat([self._chunk(tokens[:-1], evict=False), self._chunk(tokens[-1:], evict=evicts)])
        return self._chunk(tokens)

    def _chunk(self, tokens: torch.Tensor, evict: bool | None = None) -> torch.Tensor:
        if evict is not None:  # one forward, evicting after it or not (kvpress, fed in chunks)
            self.kv_press.compression_interval = 1 if evict else 2**31
        positions, n, held = (
            torch.arange(self.position, self.position + len(tokens)),
            len(tokens),
            self.held(),
        )
        logits = self._forward(tokens[None], positions)[0]
        self.position, self.fed = self.position + n, self.fed + n
        self.held_sum, self.peak = self.held_sum + n * held + n * (n + 1) // 2, max(self.peak, held + n)
        return logits

    @property
    def mean_held(self) -> float:
        """Tokens per KV head held while each fed token was read, on average."""
        return self.held_sum / max(self.fed, 1)

    def held(self) -> int:
        """Tokens per KV head the cache holds now."""
        if self.press is not None:
            return max(layer.physical_length for layer in self.cache.layers)
        return self.cache.get_seq_length()

    def evicted(self) -> bool:
        """Whether any token has been evicted yet."""
        return self.held() < self.position

    def close(self) -> None:
        self.stack.close()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {cache_kwarg(self.model): self.cache}
        if self.kv_press is not None:
            # kvpress shrinks the cache in place: RoPE takes the true positions, the cache positions
            # are the physical slots (which also keeps a chunk's causal mask right)
            held = self.cache.get_seq_length()
            kwargs |= {"position_ids": positions[None], "cache_position": held + torch.arange(len(positions))}
        return self.model(ids, **kwargs).logits


@torch.no_grad()
def teacher_forced(model, prompt, target, policy: Policy, banned: list[int], steps: bool = False) -> dict:
    """The measures of the module docstring for ``policy`` over ``target`` ``(n,)`` after ``prompt``
    ``(L,)``; ``steps`` feeds one token per forward instead of chunks."""
    try:
        logits, done = [policy.prefill(prompt, steps)[None]], 0
        evicted_at = 0 if policy.evicted() else None  # 0: the prompt's compression
        while done < len(target) - 1:
            n = min(policy.room(), len(target) - 1 - done)
            logits.append(policy.feed(target[done : done + n], steps=steps))
            done += n
            if evicted_at is None and policy.evicted():
                evicted_at = done + 1  # the first position predicted from an evicted cache
    finally:
        policy.close()
    logits = _next_logits(torch.cat(logits), banned)
    hits = logits.argmax(-1) == target
    logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
    misses = (~hits).nonzero()[:, 0].tolist()
    after = hits[evicted_at:] if evicted_at is not None else hits[:0]
    return {
        "common_prefix": misses[0] if misses else len(target),
        "top1_agreement": float(hits.float().mean()),
        "top1_after_eviction": float(after.float().mean()) if len(after) else None,
        "first_eviction": evicted_at,
        "mean_logprob": float(logprob.mean()),
        "mean_held": round(policy.mean_held),
        "peak_held": policy.peak,
        "misses": misses,
    }


def check(model, prompt, target, names, budget, interval, banned) -> list[str]:
    """Chunked against one-token feeding over ``target`` for each press: the lines to report."""
    lines = []
    for name in names:
        chunked = teacher_forced(model, prompt, target, Policy(model, name, budget, interval), banned)
        stepped = teacher_forced(model, prompt, target, Policy(model, name, budget, interval), banned, True)
        same = chunked["misses"] == stepped["misses"]
        lines.append(
            f"{name} budget {budget}: chunks {'==' if same else '!='} steps over {len(target)} tokens "
            f"(misses {len(chunked['misses'])} / {len(stepped['misses'])}, log-prob "
            f"{chunked['mean_logprob']:.5f} / {stepped['mean_logprob']:.5f})"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", default="qwen2.5-coder-0.5b", help="registry name or path (default: %(default)s)")
    add("--essays", type=int, default=6, help=f"essay-summary prompts besides the {len(SPECS)} coding "
        "specs (default: %(default)s)")  # fmt: skip
    add(
        "--essay-tokens", type=int, default=512, help="essay tokens per summary prompt (default: %(default)s)"
    )
    add("--limit", type=int, default=None, help="only the first LIMIT prompts (default: all)")
    add("--only", nargs="+", metavar="PREFIX", help="only prompts whose names start so (spec-, essay-03)")
    add("--new-tokens", type=int, default=2048, help="tokens of each generation (default: %(default)s)")
    add("--presses", nargs="+", default=["full", "clusterattn", "kvpress-snapkv", "kvpress-expectedattention",
        "streamingllm"], help="this library's press names, kvpress-snapkv, kvpress-expectedattention "
        "or full (default: %(default)s)")  # fmt: skip
    add(
        "--budgets",
        type=int,
        nargs="+",
        default=[256, 512, 1024],
        help="decode budgets (default: %(default)s)",
    )
    add("--interval", type=int, default=128, help="tokens between evictions (default: %(default)s)")
    add("--compress-prompt", action="store_true", help="compress the prompt to the budget at prefill too")
    add("--reference-batch", type=int, default=20, help="prompts per reference batch (default: %(default)s)")
    add("--check", type=int, default=0, metavar="TOKENS",
        help="first compare chunked with one-token feeding on the first prompt over TOKENS tokens at the "
        "smallest budget (default: 0, no check)")  # fmt: skip
    add("--report-only", action="store_true", help="only rebuild table.md from --out's results.jsonl")
    add("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    add("--out", default="runs/long-output", help="folder for the resumable results (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return _publish(out, report(_rows(out / "results.jsonl"), args.presses, args.budgets))
    check_presses(parser, args.presses, args.budgets, args.interval)
    if not 0 < args.interval <= 4096:
        parser.error("--interval must be in 1..4096")
    torch.set_num_threads(args.threads)
    model, tokenizer = ca.load_model(args.model)
    banned = end_tokens(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (out / "run.json").write_text(json.dumps({"args": vars(args), "commit": commit}, indent=1))
    prompts = chat_prompts(tokenizer, args.essays, args.essay_tokens)[: args.limit]
    if args.only:  # e.g. "essay-" to run the summaries first
        prompts = [(n, p) for n, p in prompts if n.startswith(tuple(args.only))]
    ref_path, res_path = out / "references.jsonl", out / "results.jsonl"
    refs = {r["prompt"]: r for r in _rows(ref_path) if r["new_tokens"] == args.new_tokens}
    todo = [(n, p) for n, p in prompts if n not in refs]
    for i in range(0, len(todo), args.reference_batch):
        batch, start = todo[i : i + args.reference_batch], time.perf_counter()
        tokens = references(model, [p for _, p in batch], args.new_tokens, banned)
        for (name, p), row in zip(batch, tokens, strict=True):
            refs[name] = {"prompt": name, "prompt_tokens": len(p), "new_tokens": args.new_tokens,
                          "tokens": row.tolist()}  # fmt: skip
            _append(ref_path, refs[name])
        print(f"references for {len(batch)} prompts: {time.perf_counter() - start:.0f} s", flush=True)
    if args.check:
        name, prompt = prompts[0]
        target = torch.tensor(refs[name]["tokens"][: args.check])
        lines = check(model, prompt, target, args.presses, min(args.budgets), args.interval, banned)
        (out / "check.txt").write_text("\n".join(lines) + "\n")
    rows = _rows(res_path)
    done = {(r["prompt"], r["press"], r["budget"]) for r in rows}
    # the largest budget first (the full cache's control with it): a stopped run has whole budgets
    for budget, (name, prompt), press in itertools.product(
        sorted(args.budgets, reverse=True), prompts, args.presses
    ):
        if press == "full":
            if budget != max(args.budgets):
                continue
            budget = 0
        target = torch.tensor(refs[name]["tokens"])
        if (name, press, budget) not in done:
            start = time.perf_counter()
            policy = Policy(model, press, budget or args.new_tokens, args.interval, args.compress_prompt)
            row = {"prompt": name, "prompt_tokens": len(prompt), "press": press, "budget": budget}
            row |= teacher_forced(model, prompt, target, policy, banned)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            _append(res_path, row)
            print(json.dumps({k: v for k, v in row.items() if k != "misses"}), flush=True)
    return _publish(out, report(rows, args.presses, args.budgets))


if __name__ == "__main__":
    raise SystemExit(main())
