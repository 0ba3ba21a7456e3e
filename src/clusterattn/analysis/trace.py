"""One full-cache run with the decode queries recorded: what profiling and analysis measure against.

:func:`trace_decode` prefills a prompt with the full cache, greedily decodes, and keeps, for every
compressible layer, the prefill's post-RoPE queries and keys (what a press selects from) and the
attention each decode query pays to the prompt tokens (what the kept set should cover).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterattn.analysis.metrics import decode_attention
from clusterattn.hf import new_cache
from clusterattn.integration import capturing_queries
from clusterattn.steps import greedy_decode, prefill, prepare_inputs


class EmptyAnswer(ValueError):
    """The model ended its answer at once: there is no decode query to measure."""


@dataclass
class DecodeTrace:
    """A recorded full-cache prefill and greedy decode of one prompt (batch of one).

    Attributes:
        queries: ``(layers, q_heads, seq, head_dim)`` prefill post-RoPE queries per compressible layer.
        keys: ``(layers, kv_heads, seq, head_dim)`` prefill post-RoPE keys.
        scaling: the attention scale (shared by the layers).
        attention: ``(layers, q_heads, steps, seq)`` fp32 attention of each decode query over the
            prompt (softmax over all keys it sees, restricted to the prompt).
        layers: indices of the compressible layers in the model.
        prompt_ids: ``(seq,)`` token ids of the prompt.
        new_tokens: ``(n,)`` generated token ids (``steps = n - 1``: the last token is never fed).
        text: the decoded answer.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    scaling: float
    attention: torch.Tensor
    layers: list[int]
    prompt_ids: torch.Tensor
    new_tokens: torch.Tensor
    text: str

    def __post_init__(self) -> None:
        n_layers, q_heads, seq, _ = self.queries.shape
        if self.keys.shape[0] != n_layers or self.keys.shape[2] != seq or q_heads % self.keys.shape[1]:
            raise ValueError(
                f"queries {tuple(self.queries.shape)} and keys {tuple(self.keys.shape)} disagree"
            )
        if self.attention.shape[:2] != (n_layers, q_heads) or self.attention.shape[3] != seq:
            raise ValueError(f"attention {tuple(self.attention.shape)} does not match queries")
        if len(self.layers) != n_layers:
            raise ValueError(f"{len(self.layers)} layer indices for {n_layers} layers")

    @property
    def seq(self) -> int:
        return self.queries.shape[2]

    @property
    def steps(self) -> int:
        return self.attention.shape[2]

    def select(self, press) -> torch.Tensor:
        """``press.select`` on the recorded prefill, all layers at once (the layer axis as the batch):
        ``(layers, kv_heads, kept)`` indices, or the whole prompt when the press keeps everything.

        Only presses with a uniform budget over layers are accepted (every ClusterAttn/SnapKV-like press).
        """
        if not getattr(press, "uniform_layers", True):
            raise ValueError(
                f"{type(press).__name__} varies its budget over layers; trace.select needs it uniform"
            )
        with torch.no_grad():
            idx = press.select(self.queries, self.keys, self.scaling, layer=0, n_layers=len(self.layers))
        if idx is None:
            idx = torch.arange(self.seq).expand(*self.keys.shape[:2], -1)
        return idx


@torch.no_grad()
def trace_decode(
    model,
    tokenizer,
    context: str,
    question: str | None = None,
    *,
    answer_prefix: str = "",
    steps: int = 32,
    stop_at_eos: bool = True,
    chat: bool = True,
) -> DecodeTrace:
    """Prefill ``context`` + ``question`` (query-aware) with the full cache and decode greedily,
    recording ``steps`` decode queries (fewer when the answer ends earlier and ``stop_at_eos``).

    Raises:
        ValueError: ``steps < 1``, a batch instead of one prompt, or an unsupported model.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(context, str):
        raise ValueError("trace_decode takes one prompt (a str context)")
    inputs = prepare_inputs(
        model,
        tokenizer,
        context,
        question,
        max_new_tokens=steps + 1,
        query_aware=True,
        answer_prefix=answer_prefix,
        chat=chat,
    )
    cache = new_cache(model)
    with capturing_queries(model) as capture:
        logits, next_pos = prefill(model, inputs, cache)
        tokens, texts, _ = greedy_decode(
            model,
            tokenizer,
            inputs,
            cache,
            logits,
            next_pos,
            max_new_tokens=steps + 1,
            ignore_eos=not stop_at_eos,
        )
    seq = inputs.prompt_ids.shape[1]
    queries, keys, attention = [], [], []
    for rank, layer in enumerate(capture.layers):
        calls = capture.calls[rank]
        if len(calls) < 2:
            raise EmptyAnswer("the answer ended before any decode step; nothing to measure")
        key = cache.layers[layer].keys
        queries.append(calls[0][0])
        keys.append(key[0, :, :seq])
        decode_q = torch.cat(calls[1:], dim=2)
        attention.append(decode_attention(decode_q, key, capture.scaling[rank], seq)[0])
    return DecodeTrace(
        queries=torch.stack(queries),
        keys=torch.stack(keys),
        scaling=capture.scaling[0],
        attention=torch.stack(attention),
        layers=list(capture.layers),
        prompt_ids=inputs.prompt_ids[0].clone(),
        new_tokens=tokens[0].clone(),
        text=texts[0],
    )
