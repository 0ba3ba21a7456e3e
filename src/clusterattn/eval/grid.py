"""Answer one prompt under many presses for the evaluation grid: the flow of
:func:`clusterattn.shared_prefill.run_presses` (one recorded prefill, replayed selections, every
compressed cache of the prompt in one left-padded decode batch), scored row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterattn.shared_prefill import run_presses
from clusterattn.steps import prepare_inputs

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
    runs, prefill_s = run_presses(
        model, tokenizer, inputs, presses, max_new_tokens=max_new_tokens, batch=batch
    )
    answers = {}
    for name, run in runs.items():
        kept = max(run.stats.kept_tokens.values()) if run.stats and run.stats.kept_tokens else None
        answers[name] = Answer(
            text=run.texts[0], new_tokens=int((run.tokens[0] != inputs.pad_id).sum()),
            kept=int(kept if kept is not None else inputs.prompt_ids.shape[1]), kv_bytes=run.kv_bytes,
            compress_s=run.stats.seconds if run.stats else 0.0, decode_s=run.decode_s,
        )  # fmt: skip
    return answers, prefill_s
