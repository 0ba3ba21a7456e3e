"""Answer fidelity: how likely a compressed cache makes the full cache's own answer.

The profiling objective ``"answer"`` (``clusterattn profile --objective answer``). The default
objective, the restricted-attention cosine (:func:`clusterattn.analysis.metrics.restricted_cosine`),
averages over every layer and head, so the few heads that copy an answer (a needle's digits, one per
token) weigh little against the many that attend to a handful of tokens; at 4k it can prefer plain
top-k, which keeps the peaks and drops the digits after them. This objective scores what the
answer needs instead: the full cache greedily answers a profile sample, and each candidate press
is scored by the mean log-probability, teacher-forced, that its compressed cache gives to that same
answer. It uses no labels, only the model's own full-cache output on the profile split.
"""

from __future__ import annotations

import torch

from clusterattn.analysis.data import TaskSample
from clusterattn.hf import cache_kwarg
from clusterattn.presses.clusterattn import ClusterAttnPress
from clusterattn.replay import replay
from clusterattn.steps import NoPress, prepare_inputs, record_prefill


def teacher_forced_logprob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of ``target`` ``(n,)`` under ``logits`` ``(n, vocab)`` (row i predicts
    ``target[i]``), computed in float32."""
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    return logits.float().log_softmax(-1).gather(-1, target[:, None]).mean()


@torch.no_grad()
def answer_logprobs(
    model, tokenizer, sample: TaskSample, answer: torch.Tensor, configs: list[dict]
) -> torch.Tensor:
    """Mean log-probability per token of the full cache's greedy ``answer`` ``(n,)`` (ids, as
    :attr:`~clusterattn.analysis.trace.DecodeTrace.new_tokens`) under each configuration's compressed
    cache, ``(len(configs),)``; query-aware prompt, one shared full prefill.

    The first answer token comes from the prefill's own logits, the same for every press (the
    prompt is compressed after each layer's attention), so tokens ``1..n-1`` are scored: ``answer[:-1]``
    is fed after the compressed cache and each position predicts the next token. A configuration
    that keeps the whole prompt scores the full cache's value. Raises ValueError for an answer of
    fewer than two tokens (nothing to score).
    """
    answer = torch.as_tensor(answer, dtype=torch.long).flatten()
    if answer.numel() < 2:
        raise ValueError("the answer needs at least two tokens to score a compressed cache")
    inputs = prepare_inputs(
        model,
        tokenizer,
        sample.context,
        sample.question,
        max_new_tokens=1,
        query_aware=True,
        answer_prefix=sample.answer_prefix,
        chat=True,
    )
    record, _ = record_prefill(model, inputs)
    device = inputs.prompt_ids.device
    fed, target = answer[:-1][None].to(device), answer[1:].to(device)
    mask = torch.cat([inputs.prompt_mask, torch.ones_like(fed)], -1)
    positions = record.next_pos[:, None] + torch.arange(fed.shape[1], device=device)
    kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": True}
    name = cache_kwarg(model)
    full = None
    out = torch.empty(len(configs))
    for i, config in enumerate(configs):
        press = ClusterAttnPress(**config)
        if inputs.prompt_ids.shape[1] <= press.budget:  # nothing evicted: the full cache's score
            if full is None:
                cache, _ = replay(record, NoPress())
                logits = model(input_ids=fed, **kwargs, **{name: cache}).logits
                full = teacher_forced_logprob(logits[0], target)
            out[i] = full
            continue
        cache, _ = replay(record, press)
        with press(model):  # the session keeps positions and masks right on the compressed cache
            logits = model(input_ids=fed, **kwargs, **{name: cache}).logits
        out[i] = teacher_forced_logprob(logits[0], target)
    return out
