"""One prompt, many presses: one recorded prefill, each press replayed on it, greedy decoding.

The flow behind :func:`clusterattn.generate_many` and the evaluation grid
(:func:`clusterattn.eval.grid.answer_all`). Selections are exactly the live path's
(:mod:`clusterattn.replay`). With ``batch=True`` the replayed caches of one prompt decode together:
every compressed cache of the prompt joins one left-padded batch (each compressed layer carries its
slot mask, so per-layer budgets and Gemma3's whole sliding layers pad the same way), which on CPU
costs little more than one row (decoding reads all the weights per step whatever the batch); rows
then follow the same greedy decode as alone, up to float rounding of batched matrix products.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from clusterattn.batching import batch_key, is_padded, stack_caches, stack_padded
from clusterattn.cache import CompressionStats
from clusterattn.hf import kv_bytes, masked_gqa
from clusterattn.replay import replay
from clusterattn.steps import Inputs, NoPress, greedy_decode, record_prefill


@dataclass
class PressRun:
    """One press's run on the shared prefill: ``tokens`` ``(batch, new)`` (pad after EOS),
    ``texts``, the compression's ``stats`` (None for the full cache), the prompt cache's
    ``kv_bytes`` before decoding, and its share of the decode time."""

    tokens: torch.Tensor
    texts: list[str]
    stats: CompressionStats | None
    kv_bytes: int
    decode_s: float


def compressing(press) -> bool:
    """True for a press that selects; False for None and ``FullKV()``; TypeError for anything else
    (a press name such as ``"snapkv"`` is not a press: build it with ``PRESSES[name](...)``)."""
    if press is None or type(press).__name__ == "FullKV":
        return False
    if not callable(getattr(press, "select", None)):
        raise TypeError(
            "press must be a press object (e.g. ClusterAttnPress(budget=256)), None or FullKV(), "
            f"got {press!r}"
        )
    return True


def _repeat(inputs: Inputs, n: int) -> Inputs:
    rest = None if inputs.rest is None else inputs.rest.repeat(n, 1)
    return Inputs(inputs.prompt_ids.repeat(n, 1), inputs.prompt_mask.repeat(n, 1), rest, True, inputs.pad_id)


@torch.no_grad()
def run_presses(
    model, tokenizer, inputs: Inputs, presses: dict, *, max_new_tokens: int, batch: bool = False
) -> tuple[dict[object, PressRun], float]:
    """Every press of ``presses`` (``{name: press or None}``) on one shared prefill of ``inputs``.

    Args:
        batch: decode the presses of one prompt as batches (``inputs`` must hold one prompt);
            False decodes each press alone (any batch of prompts).

    Returns:
        ``({name: PressRun}, prefill seconds)``.
    """
    selecting = {name: compressing(press) for name, press in presses.items()}  # checks before any work
    if batch and inputs.prompt_ids.shape[0] != 1:
        raise ValueError("batched decoding of presses takes one prompt")
    record, prefill_s = record_prefill(model, inputs)
    pressed = {}
    for name, press in presses.items():
        cache, stats = replay(record, press if selecting[name] else NoPress())
        pressed[name] = (cache, stats if selecting[name] else None, kv_bytes(cache))
    groups: dict[tuple, list] = defaultdict(list)
    for name, (cache, stats, _) in pressed.items():
        key = (batch_key(cache) if stats is not None else ("full",)) if batch else (name,)
        groups[key].append(name)
    runs = {}
    for key, names in groups.items():
        caches = [pressed[name][0] for name in names]
        if len(names) == 1:
            merged = caches[0]
        else:
            merged = stack_padded(caches)[0] if is_padded(key) else stack_caches(caches)
        rows = len(names)
        many = _repeat(inputs, rows) if rows > 1 else inputs
        with masked_gqa(is_padded(key) and rows > 1):
            tokens, texts, decode_s = greedy_decode(
                model, tokenizer, many, merged, record.logits.repeat(rows, 1, 1),
                record.next_pos.repeat(rows), max_new_tokens=max_new_tokens,
            )  # fmt: skip
        width = inputs.prompt_ids.shape[0]
        for row, name in enumerate(names):
            _, stats, prompt_bytes = pressed[name]
            part = slice(row * width, (row + 1) * width)
            runs[name] = PressRun(tokens[part], texts[part], stats, prompt_bytes, decode_s / rows)
    return runs, prefill_s
