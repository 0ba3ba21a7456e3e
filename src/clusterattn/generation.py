"""``generate()``: prefill (compressed by a press), optional question, greedy decode, with stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from clusterattn.cache import CompressedCache
from clusterattn.chunked import check_chunk
from clusterattn.compiled import BACKENDS, compiled_greedy_decode, static_cache, static_prompt_bytes
from clusterattn.hf import kv_bytes, new_cache
from clusterattn.shared_prefill import compressing, run_presses
from clusterattn.steps import build_prompt, greedy_decode, prefill, prepare_inputs  # noqa: F401


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
    compile: bool | str = False,
    prefill_chunk: int | None = None,
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
        compile: decode from a static cache with the one-token step compiled by ``torch.compile``
            (:mod:`clusterattn.compiled`; on CUDA captured in a CUDA graph), for the full cache and
            every press alike; ``True`` uses inductor, a string names the backend (``"eager"``,
            ``"aot_eager"``). Token-identical to the eager path in fp32. The first call compiles.
        prefill_chunk: run each decoder layer over at most this many prompt tokens at a time
            during the prefill (:mod:`clusterattn.chunked`: each chunk's queries attend to every
            earlier token): the same outputs, a lower memory peak at long prompts, where a layer's
            activations, not the cache, set it. Multiples of 512 are bit-identical with sdpa on CPU;
            other sizes agree to float rounding. None: one pass.

    Returns:
        :class:`GenerationOutput`; ``stats["prefill_s"]`` excludes ``stats["compress_s"]``.
    """
    check_chunk(prefill_chunk)
    inputs = prepare_inputs(
        model, tokenizer, context, question, max_new_tokens=max_new_tokens, query_aware=query_aware,
        answer_prefix=answer_prefix, chat=chat,
    )  # fmt: skip
    selecting = compressing(press)
    if compile:
        backend = "inductor" if compile is True else compile
        if backend not in BACKENDS:  # before any prefill
            raise ValueError(f"compile backend must be one of {BACKENDS}, got {backend!r}")
        rest = 0 if inputs.rest is None else inputs.rest.shape[1]
        cache = static_cache(
            model, press if selecting else None, inputs.prompt_ids.shape[1] + rest + max_new_tokens
        )
    else:
        cache = CompressedCache(model, press) if selecting else new_cache(model)
    stats = getattr(cache, "stats", None)
    start = time.perf_counter()
    logits, next_pos = prefill(model, inputs, cache, chunk=prefill_chunk)
    prefill_s = time.perf_counter() - start - (stats.seconds if stats else 0.0)
    prompt_bytes = kv_bytes(cache) if not compile else static_prompt_bytes(cache)
    if compile:
        tokens, texts, decode_s = compiled_greedy_decode(
            model, tokenizer, inputs, cache, logits, next_pos, max_new_tokens=max_new_tokens,
            backend=backend,
        )  # fmt: skip
    else:
        tokens, texts, decode_s = greedy_decode(
            model, tokenizer, inputs, cache, logits, next_pos, max_new_tokens=max_new_tokens
        )
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
    inputs = prepare_inputs(
        model, tokenizer, context, question, max_new_tokens=max_new_tokens, query_aware=query_aware,
        answer_prefix=answer_prefix, chat=chat,
    )  # fmt: skip
    runs, prefill_s = run_presses(model, tokenizer, inputs, presses, max_new_tokens=max_new_tokens)
    return {
        name: _output(inputs, run.tokens, run.texts, run.kv_bytes, run.stats, prefill_s, run.decode_s)
        for name, run in runs.items()
    }
