"""The building blocks of generation, shared by :func:`clusterattn.generate`, the evaluation grid,
the bench and the analyses: prompt building, one prefill, greedy decoding, a recorded prefill.

A public internal API: keyword arguments past the obvious positional ones, no hidden state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from clusterattn.batching import select_rows
from clusterattn.cache import CompressedCache, CompressedLayer
from clusterattn.chunked import prefill_chunks
from clusterattn.hf import cache_kwarg, rope_frequencies
from clusterattn.replay import PrefillRecord, Recorder

_PLACEHOLDER = "\u2063clusterattn-context\u2063"


def build_prompt(tokenizer, context: str, question: str | None, answer_prefix: str = "", chat: bool = True):
    """Split the prompt text into the context part and the rest (question, template tail, prefix).

    With a chat template the user turn is ``context + "\\n\\n" + question``. Both parts are
    tokenised separately, so query-aware and query-agnostic runs see identical token ids.
    """
    if not isinstance(context, str) or not context.strip():
        raise ValueError("context must be a non-empty string")
    if question is not None and not isinstance(question, str):
        raise TypeError(f"question must be a str or None, got {type(question).__name__}")
    user = context if question is None else f"{context}\n\n{question}"
    if chat and getattr(tokenizer, "chat_template", None):
        render = lambda content: tokenizer.apply_chat_template(  # noqa: E731
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        text = render(user)
        # split where the context stands in the user turn, not at its first occurrence in the text
        # (a short context may also appear in the template's own system prompt)
        marked = render(user.replace(context, _PLACEHOLDER, 1))
        at = marked.find(_PLACEHOLDER)
        head = marked[:at] + context
        tail = marked[at + len(_PLACEHOLDER) :]
        if at < 0 or head + tail != text:
            raise ValueError(
                "the chat template rewrites the context; pass chat=False to build the prompt by hand"
            )
    else:
        head, tail = context, user[len(context) :]
        if tokenizer.bos_token and not head.startswith(tokenizer.bos_token):
            head = tokenizer.bos_token + head
    tail = tail + (answer_prefix or "")
    return head, tail


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a greedy answer (the model's generation config, else the tokenizer's)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@dataclass
class Inputs:
    prompt_ids: torch.Tensor  # (batch, seq) the part compressed during prefill, left-padded
    prompt_mask: torch.Tensor
    rest: torch.Tensor | None  # (batch, n) appended after compression (query_aware=False)
    batched: bool
    pad_id: int


def prepare_inputs(
    model,
    tokenizer,
    context: str | list[str],
    question: str | list[str] | None = None,
    *,
    max_new_tokens: int,
    query_aware: bool = True,
    answer_prefix: str = "",
    chat: bool = True,
) -> Inputs:
    """Tokenise ``context`` (one or a list, left-padded) and ``question`` as :func:`generate` does:
    the part compressed at prefill and, with ``query_aware=False``, the part appended after it."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    batched = isinstance(context, (list, tuple))
    contexts = list(context) if batched else [context]
    if not contexts:
        raise ValueError("context must not be an empty list")
    questions = list(question) if isinstance(question, (list, tuple)) else [question] * len(contexts)
    if len(questions) != len(contexts):
        raise ValueError(f"question has {len(questions)} entries for {len(contexts)} contexts")
    pairs = zip(contexts, questions, strict=True)
    parts = [build_prompt(tokenizer, c, q, answer_prefix, chat) for c, q in pairs]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    heads, tails = [encode(h) for h, _ in parts], [encode(t) for _, t in parts]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rest = None
    if query_aware:
        prompt_ids, prompt_mask = _left_pad([h + t for h, t in zip(heads, tails, strict=True)], pad_id)
    else:
        prompt_ids, prompt_mask = _left_pad(heads, pad_id)
        if len({len(t) for t in tails}) != 1:
            raise ValueError("query_aware=False needs questions of equal token length in a batch")
        if not tails[0]:
            raise ValueError(
                "query_aware=False appends the question after compression, but there is nothing to append "
                "(no question, no chat template tail, no answer prefix); pass a question or query_aware=True"
            )
        rest = torch.tensor(tails, dtype=torch.long, device=device)
    return Inputs(prompt_ids.to(device), prompt_mask.to(device), rest, batched, pad_id)


def prefill(model, inputs: Inputs, cache, *, chunk: int | None = None):
    """One prefill of ``inputs.prompt_ids`` into ``cache`` (compressed when the cache is armed);
    returns the last logits ``(batch, 1, vocab)`` and each row's next position ``(batch,)``.
    ``chunk``: run each decoder layer over at most that many tokens at a time (:mod:`clusterattn.chunked`)."""
    positions = (inputs.prompt_mask.cumsum(-1) - 1).clamp_min(0)
    with prefill_chunks(model, chunk, overwrite=True):  # nothing here keeps the layers' inputs
        logits = model(
            input_ids=inputs.prompt_ids, attention_mask=inputs.prompt_mask, position_ids=positions,
            use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache},
        ).logits  # fmt: skip
    return logits, positions[:, -1] + 1


def greedy_decode(
    model,
    tokenizer,
    inputs: Inputs,
    cache,
    logits,
    next_pos,
    *,
    max_new_tokens: int,
    ignore_eos: bool = False,
):
    """Append the uncompressed rest (if any), then greedy-decode; returns (tokens, texts, seconds)."""
    name, device = cache_kwarg(model), inputs.prompt_ids.device
    start = time.perf_counter()
    logits, mask, next_pos = feed_rest(model, inputs, cache, logits, next_pos)
    eos = set() if ignore_eos else eos_ids(model, tokenizer)
    # rows still decoding (their index in the batch); a row that emits EOS leaves the batch, and
    # its later tokens stay pad_id
    active = torch.arange(inputs.prompt_ids.shape[0], device=device)
    out = torch.full((len(active), max_new_tokens), inputs.pad_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        out[active, step] = token
        done = torch.tensor([t in eos for t in token.tolist()], dtype=torch.bool, device=device)  # one copy
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            active, token, mask, next_pos = active[keep], token[keep], mask[keep], next_pos[keep]
            select_rows(cache, keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
            use_cache=True, **{name: cache},
        ).logits  # fmt: skip
        next_pos = next_pos + 1
    seconds = time.perf_counter() - start
    tokens = out[:, : step + 1]
    return tokens, answer_texts(model, tokenizer, tokens, inputs.pad_id), seconds


def feed_rest(model, inputs: Inputs, cache, logits, next_pos):
    """Append ``inputs.rest`` (the question after compression, query-agnostic) in one forward;
    returns the last logits, the 2-D mask over prompt and rest, and the next positions."""
    mask = inputs.prompt_mask
    if inputs.rest is None:
        return logits, mask, next_pos
    # in one forward: the compressed layers' masks follow from their own lengths (and layers of
    # unequal length, PyramidKV, get theirs fitted per layer by integration.fit_mask)
    rest = inputs.rest
    mask = torch.cat([mask, torch.ones_like(rest)], -1)
    positions = next_pos[:, None] + torch.arange(rest.shape[1], device=rest.device)
    logits = model(
        input_ids=rest, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
        **{cache_kwarg(model): cache},
    ).logits  # fmt: skip
    return logits, mask, next_pos + rest.shape[1]


def answer_texts(model, tokenizer, tokens: torch.Tensor, pad_id: int) -> list[str]:
    """Each row of ``tokens`` as text, without EOS and padding."""
    skip = eos_ids(model, tokenizer) | {pad_id}
    return [
        tokenizer.decode([t for t in row.tolist() if t not in skip], skip_special_tokens=True)
        for row in tokens
    ]


def record_prefill(model, inputs: Inputs) -> tuple[PrefillRecord, float]:
    """One full prefill with every compressible layer's queries recorded; returns it and its seconds."""
    recorder = Recorder()
    cache = CompressedCache(model, recorder)
    start = time.perf_counter()
    logits, next_pos = prefill(model, inputs, cache)
    prefill_s = time.perf_counter() - start
    layers = [i for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)]
    try:
        frequencies = rope_frequencies(model)
        inv_freq = {i: frequencies(i).detach().clone() for i in layers}
    except ValueError:  # a model without RoPE: presses that unrotate keys refuse its record
        inv_freq = None
    record = PrefillRecord(
        cache=cache, queries=recorder.queries, scaling=recorder.scaling, layers=layers,
        pad_mask=recorder.pad_mask, next_pos=next_pos, logits=logits, inv_freq=inv_freq,
    )  # fmt: skip
    return record, prefill_s


class NoPress:
    """A press that keeps everything (what :func:`~clusterattn.replay.replay` makes of the full cache)."""

    uniform_layers = True

    def warm_up(self) -> None:
        pass

    def select(self, *args, **kwargs):
        return None
