"""Answer one prompt under many presses: one recorded prefill, replayed selections, batched decoding.

Every uniform-budget press leaves a cache with one length across its layers, so all of them, at
every budget, decode together as one left-padded batch (decoding a 135M model on CPU reads all its
weights per step whatever the batch, so 25 rows cost little more than one); presses with per-layer
budgets (PyramidKV) form a second batch, padded and masked layer by layer. Selections are exactly
the live path's (:mod:`clusterattn.replay`); batched rows follow the same greedy decode as
:func:`clusterattn.generate`, up to float rounding of batched matrix products.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from clusterattn.batching import batch_key, is_padded, masked_gqa, stack_caches, stack_padded
from clusterattn.integration import kv_bytes
from clusterattn.replay import replay
from clusterattn.steps import Inputs, greedy_decode, prepare_inputs, record_prefill

SETTINGS = ("query_aware", "query_agnostic")


@dataclass
class Answer:
    """One press's answer to one prompt: text, kept tokens per layer (max), KV bytes, seconds."""

    text: str
    new_tokens: int
    kept: int
    kv_bytes: int
    compress_s: float
    decode_s: float


def _repeat(inputs: Inputs, n: int) -> Inputs:
    rest = None if inputs.rest is None else inputs.rest.repeat(n, 1)
    return Inputs(inputs.prompt_ids.repeat(n, 1), inputs.prompt_mask.repeat(n, 1), rest, True, inputs.pad_id)


@torch.no_grad()
def answer_all(
    model,
    tokenizer,
    *,
    context: str,
    question: str,
    answer_prefix: str,
    presses: dict[str, object],
    setting: str,
    max_new_tokens: int,
    chat: bool = True,
    batch: bool = True,
) -> tuple[dict[str, Answer], float]:
    """Answer one prompt with every press of ``presses`` (``None`` = full cache).

    Args:
        setting: ``"query_aware"`` (question inside the compressed prompt) or ``"query_agnostic"``
            (context compressed alone, question appended afterwards).
        batch: decode presses that leave equal cache shapes together (False: one at a time).

    Returns:
        ``({name: Answer}, prefill seconds)``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    inputs = prepare_inputs(
        model, tokenizer, context, question, max_new_tokens=max_new_tokens,
        query_aware=setting == "query_aware", answer_prefix=answer_prefix, chat=chat,
    )  # fmt: skip
    if inputs.prompt_ids.shape[0] != 1:
        raise ValueError("answer_all takes one prompt")
    record, prefill_s = record_prefill(model, inputs)
    cache, logits, next_pos = record.cache, record.logits, record.next_pos
    pressed: dict[str, tuple] = {}
    prompt_bytes: dict[str, int] = {}
    for name, press in presses.items():
        if press is None or not hasattr(press, "select"):
            pressed[name] = (cache, None)
        else:
            pressed[name] = replay(record, press)
        prompt_bytes[name] = kv_bytes(pressed[name][0])
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, (c, stats) in pressed.items():
        key = (batch_key(c) if stats is not None else ("full",)) if batch else (name,)
        groups[key].append(name)
    answers: dict[str, Answer] = {}
    for key, names in groups.items():
        caches = [pressed[n][0] for n in names]
        compressed = pressed[names[0]][1] is not None
        if len(names) == 1:
            merged = caches[0]
        else:
            merged = stack_padded(caches)[0] if is_padded(key) else stack_caches(caches)
        if not compressed and len(names) > 1:
            raise AssertionError("several full-cache presses in one grid")
        rows = len(names)
        with masked_gqa(is_padded(key) and len(names) > 1):
            tokens, texts, decode_s = greedy_decode(
                model, tokenizer, _repeat(inputs, rows), merged, logits.repeat(rows, 1, 1),
                next_pos.repeat(rows), max_new_tokens=max_new_tokens,
            )  # fmt: skip
        eos_pad = tokens != inputs.pad_id
        for row, name in enumerate(names):
            c, stats = pressed[name]
            kept = (
                max(stats.kept_tokens.values()) if stats and stats.kept_tokens else inputs.prompt_ids.shape[1]
            )
            answers[name] = Answer(
                text=texts[row], new_tokens=int(eos_pad[row].sum()), kept=int(kept),
                kv_bytes=prompt_bytes[name], compress_s=stats.seconds if stats else 0.0,
                decode_s=decode_s / rows,
            )  # fmt: skip
    return answers, prefill_s
