"""``generate()``: prefill (compressed by a press), optional question, greedy decode, with stats."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from clusterattn.batching import select_rows
from clusterattn.integration import cache_kwarg, kv_bytes, new_cache
from clusterattn.replay import PrefillRecord, recording, replay


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    ``text``: decoded answer (a list for batched input); ``tokens``: ``(batch, new_tokens)`` ids;
    ``stats``: prompt tokens, kept tokens per layer, KV bytes of the prompt cache without and with
    compression (measured after prefill, before decoding), timings in seconds.
    """

    text: str | list[str]
    tokens: torch.Tensor
    stats: dict = field(default_factory=dict)


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
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        end = text.index(context) + len(context)
        head, tail = text[:end], text[end:]
    else:
        head, tail = context, user[len(context) :]
        if tokenizer.bos_token and not head.startswith(tokenizer.bos_token):
            head = tokenizer.bos_token + head
    tail = tail + (answer_prefix or "")
    return head, tail


def _eos_ids(model, tokenizer) -> set[int]:
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
class _Inputs:
    prompt_ids: torch.Tensor  # (batch, seq) the part compressed during prefill, left-padded
    prompt_mask: torch.Tensor
    rest: torch.Tensor | None  # (batch, n) appended after compression (query_aware=False)
    batched: bool
    pad_id: int


def _prepare(
    model, tokenizer, context, question, max_new_tokens, query_aware, answer_prefix, chat
) -> _Inputs:
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
        rest = torch.tensor(tails, dtype=torch.long, device=device)
    return _Inputs(prompt_ids.to(device), prompt_mask.to(device), rest, batched, pad_id)


def _prefill(model, inputs: _Inputs, cache):
    positions = (inputs.prompt_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=inputs.prompt_ids, attention_mask=inputs.prompt_mask, position_ids=positions,
        use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache},
    ).logits  # fmt: skip
    return logits, positions[:, -1] + 1


def _decode(model, tokenizer, inputs: _Inputs, cache, logits, next_pos, max_new_tokens, ignore_eos=False):
    """Append the uncompressed rest (if any), then greedy-decode; returns (tokens, texts, seconds)."""
    name, device = cache_kwarg(model), inputs.prompt_ids.device
    mask, start = inputs.prompt_mask, time.perf_counter()
    if inputs.rest is not None:
        # in one forward: layers of unequal length (PyramidKV) get their mask fitted per layer
        # (integration.fit_mask), and on models with sliding layers the press builds the compressed
        # layers' causal mask itself (PressSession.layer_mask)
        rest = inputs.rest
        mask = torch.cat([mask, torch.ones_like(rest)], -1)
        step_pos = next_pos[:, None] + torch.arange(rest.shape[1], device=device)
        logits = model(
            input_ids=rest, attention_mask=mask, position_ids=step_pos, use_cache=True,
            logits_to_keep=1, **{name: cache},
        ).logits  # fmt: skip
        next_pos = next_pos + rest.shape[1]
    eos = set() if ignore_eos else _eos_ids(model, tokenizer)
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
    skip = _eos_ids(model, tokenizer) | {inputs.pad_id}
    texts = [
        tokenizer.decode([t for t in row.tolist() if t not in skip], skip_special_tokens=True)
        for row in tokens
    ]
    return tokens, texts, seconds


def _output(inputs, tokens, texts, after, stats, prefill_s, decode_s) -> GenerationOutput:
    rest = 0 if inputs.rest is None else inputs.rest.shape[1]
    info = {
        "prompt_tokens": int(inputs.prompt_ids.shape[1] + rest),
        "compressed_tokens": int(inputs.prompt_ids.shape[1]),
        "kept_tokens": dict(stats.kept_tokens) if stats else {},
        "kv_bytes_full": int(after + ((stats.full_bytes - stats.kept_bytes) if stats else 0)),
        "kv_bytes": int(after),
        "prefill_s": prefill_s,
        "compress_s": stats.seconds if stats else 0.0,
        "decode_s": decode_s,
        "new_tokens": int(tokens.shape[1]),
    }
    return GenerationOutput(text=texts if inputs.batched else texts[0], tokens=tokens, stats=info)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    context: str | list[str],
    question: str | list[str] | None = None,
    *,
    press=None,
    max_new_tokens: int = 32,
    query_aware: bool = True,
    answer_prefix: str = "",
    chat: bool = True,
) -> GenerationOutput:
    """Greedy generation from a long ``context`` with the prompt cache compressed by ``press``.

    Args:
        context: the document (or a list of documents for a batch, left-padded).
        question: appended after the context (one per document, or one for all).
        press: a press (e.g. ``ClusterAttnPress(budget=256)``); None or ``FullKV()`` = full cache.
        query_aware: True puts the question inside the compressed prompt (the paper's setting);
            False compresses the context alone and appends the question afterwards, uncompressed.
        answer_prefix: text appended after the generation prompt (e.g. RULER's answer prefix).
        chat: apply the tokenizer's chat template when it has one.

    Returns:
        :class:`GenerationOutput`; ``stats["prefill_s"]`` excludes ``stats["compress_s"]``.
    """
    inputs = _prepare(model, tokenizer, context, question, max_new_tokens, query_aware, answer_prefix, chat)
    cache = new_cache(model)
    with press(model) if press is not None else contextlib.nullcontext() as session:
        start = time.perf_counter()
        logits, next_pos = _prefill(model, inputs, cache)
        stats = getattr(session, "stats", None)
        prefill_s = time.perf_counter() - start - (stats.seconds if stats else 0.0)
        prompt_bytes = kv_bytes(cache)
        tokens, texts, decode_s = _decode(model, tokenizer, inputs, cache, logits, next_pos, max_new_tokens)
    return _output(inputs, tokens, texts, prompt_bytes, stats, prefill_s, decode_s)


@torch.no_grad()
def generate_many(
    model,
    tokenizer,
    context: str | list[str],
    question: str | list[str] | None = None,
    *,
    presses: dict[str, object],
    max_new_tokens: int = 32,
    query_aware: bool = True,
    answer_prefix: str = "",
    chat: bool = True,
) -> dict[str, GenerationOutput]:
    """Like :func:`generate` for several presses, sharing one prefill.

    The prefill runs once with the full cache while each layer's queries are recorded; every press
    then selects from the recorded keys (:func:`clusterattn.replay.replay`). The caches, and so
    the answers, are those of the live layer-wise path; only the peak memory differs (all layers are
    full at once here). Meant for evaluation, where a press grid over the same prompts is common.
    ``prefill_s`` is the shared prefill's time in every output.
    """
    inputs = _prepare(model, tokenizer, context, question, max_new_tokens, query_aware, answer_prefix, chat)
    record, prefill_s = _record_prefill(model, inputs)
    logits, next_pos = record.logits, record.next_pos
    outputs = {}
    for name, press in presses.items():
        compressing = press is not None and hasattr(press, "select")
        pressed, stats = replay(record, press if compressing else _NoPress())
        stats = stats if compressing else None
        prompt_bytes = kv_bytes(pressed)
        with press(model) if stats is not None else contextlib.nullcontext():
            tokens, texts, decode_s = _decode(
                model, tokenizer, inputs, pressed, logits, next_pos, max_new_tokens
            )
        outputs[name] = _output(inputs, tokens, texts, prompt_bytes, stats, prefill_s, decode_s)
    return outputs


def _record_prefill(model, inputs: _Inputs) -> tuple[PrefillRecord, float]:
    """One full prefill with every compressible layer's queries recorded; returns it and its seconds."""
    cache = new_cache(model)
    with recording(model) as recorder:
        start = time.perf_counter()
        logits, next_pos = _prefill(model, inputs, cache)
        prefill_s = time.perf_counter() - start
    session = recorder.session
    record = PrefillRecord(
        cache=cache, queries=recorder.queries, scaling=recorder.scaling, layers=session.layers,
        pad_mask=session._pad_mask, next_pos=next_pos, logits=logits,
    )  # fmt: skip
    return record, prefill_s


class _NoPress:
    def warm_up(self) -> None:
        pass

    def select(self, *args, **kwargs):
        return None
