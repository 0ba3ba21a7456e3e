"""Decode-phase eviction inside vLLM (the worker side of a :class:`DecodingPress` spec).

A request whose spec has ``decode_budget=D`` (and ``interval=I``) keeps, per decoder layer, the
post-RoPE queries of its last ``w`` fed tokens (``w = DecodingPress.observed_queries``). Its cache
length follows :func:`clusterattn.vllm.spec.physical_length`: the prefill step keeps the prompt's
selection (and, after a preemption, the earlier output behind it); every decode step appends one
token; the step that brings the request to ``D + I`` tokens re-selects, after each layer's own
attention, ``D`` of them per KV head with the wrapped press's own rule
(``DecodingPress.decode_press.select``, the window as its queries, the held keys as its "prompt"),
read back from vLLM's paged cache through the request's block table, and writes them, ascending,
into the request's first ``D`` slots. RoPE positions stay the logical ones; slots and lengths are
shifted by ``computed - physical`` (:meth:`DecodeEviction.plan`). The scheduler derives the same
length from the same function (``ClusterAttnScheduler.update_from_output``) and frees the blocks
past it, so the two sides never talk.

Preemption: the request comes back as a prefill of its prompt and ``k`` earlier output tokens. It
is brought to ``physical_length(..., k, ...)`` directly: the prompt's selection, the output tokens
behind it, then one re-selection to ``D`` at the last re-selection point the formula implies (its
window: the ``w`` queries before that point), and the tokens after it. The length is exact; the
tokens kept are not those of the uninterrupted run (which re-selected several times).

Faults: should the press raise, the request keeps its most recent tokens instead (the same count,
logged once), as a failing prompt press does (:mod:`clusterattn.vllm.hooks`); should the paged
cache not read back exactly (:func:`cache_layout`, e.g. an fp8 cache), it keeps its oldest ``D``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from clusterattn.presses import DecodingPress
from clusterattn.vllm.compaction import gather_tokens, select_kept
from clusterattn.vllm.spec import kept_tokens, physical_length

logger = logging.getLogger("clusterattn.vllm")


@dataclass
class Track:
    """A decode-evicting request the worker follows, from its prefill until it finishes or is preempted.

    ``kept``: prompt tokens kept at prefill (None: the whole prompt); ``windows``: per layer index,
    the last ``<= w`` post-RoPE queries ``(tokens, q_heads, head_dim)``, oldest first.
    """

    req_id: str
    press: DecodingPress
    prompt_len: int
    kept: int | None
    n_layers: int  # decoder attention layers of the model (the press's n_layers)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    failed: bool = False  # the press raised once: the most recent tokens from then on

    def physical(self, computed: int) -> int:
        """Slots held once ``computed`` tokens are in the cache."""
        press = self.press
        return physical_length(
            self.prompt_len, self.kept, computed - self.prompt_len, press.budget, press.interval
        )

    @property
    def fixed(self) -> int:
        """Leading slots a re-selection never evicts (the prompt's, with ``protect_prompt``)."""
        if not self.press.protect_prompt:
            return 0
        return self.prompt_len if self.kept is None else self.kept

    @property
    def rule(self):
        """The wrapped press at the budget each re-selection chooses (less the protected slots)."""
        rule = self.press.decode_press
        fixed = self.fixed
        return dataclasses.replace(rule, budget=self.press.budget - fixed) if fixed else rule


@dataclass
class _Item:
    """One decode-evicting request in the current step: its rows ``start .. start + count`` of the
    flat batch, batch row ``row``, and the slots it holds before and after the step."""

    track: Track
    row: int
    start: int
    count: int
    before: int
    after: int
    prefill: bool

    @property
    def reselects(self) -> bool:
        return self.after < self.before + self.count


STEP: list[_Item] = []  # the step being executed (read by the attention hook)


def check_whole_prompt(req_id: str, computed: int, count: int, prompt_len: int) -> None:
    """Raise unless this step runs the request's whole prompt (``count`` tokens from position
    ``computed``): eviction compresses a prompt in the step that prefills it."""
    if computed != 0 or count < prompt_len:
        raise RuntimeError(f"request {req_id}: its prompt was split across steps; eviction needs it whole")


_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class DecodeEviction:
    """The worker's decode-eviction state (one per model runner)."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.tracks: dict[str, Track] = {}

    def forget(self, req_id: str) -> None:
        self.tracks.pop(req_id, None)

    def plan(self, req_id, press, row, start, prompt_len, computed, count) -> int | None:
        """Note the request's part in this step; returns the slot offset of its row (``computed -
        physical``), or None when it is not a decode-evicting request."""
        track = self.tracks.get(req_id)
        if track is None:
            if not isinstance(press, DecodingPress):
                return None
            check_whole_prompt(req_id, computed, count, prompt_len)
            kept = kept_tokens(press, prompt_len)
            track = self.tracks[req_id] = Track(req_id, press, prompt_len, kept, self.n_layers)
            STEP.append(_Item(track, row, start, count, 0, track.physical(count), prefill=True))
            return 0
        if count != 1:
            raise RuntimeError(
                f"request {req_id}: {count} tokens in one decode step; decode eviction needs 1"
            )
        before = track.physical(computed)
        STEP.append(_Item(track, row, start, count, before, track.physical(computed + 1), prefill=False))
        return computed - before

    @staticmethod
    def finish_step(trims: list[tuple[str, int]]) -> None:
        """After the step: the requests whose cache shrank, with their new length, go to ``trims``."""
        trims.extend((item.track.req_id, item.after) for item in STEP if item.reselects)
        STEP.clear()


def after_attention(impl, layer, layer_idx: int, query, key, value, kv_cache, attn_metadata) -> None:
    """After one layer's attention: keep each decode-evicting request's window; re-select (or, in
    its prefill step, compact) the requests whose length shrinks in this step.

    ``query`` ``(tokens, q_heads, head_dim)``, ``key`` / ``value`` ``(tokens, kv_heads, head_dim)``
    of the flat batch; ``kv_cache`` ``(blocks, kv_heads, block_size, 2 * head_dim)``.
    """
    for item in STEP:
        track, span = item.track, slice(item.start, item.start + item.count)
        observed = track.press.observed_queries
        held = track.windows.get(layer_idx)
        window = query[span] if held is None else torch.cat([held, query[span]])
        track.windows[layer_idx] = window[-observed:].clone()
        if not item.reselects:
            continue
        if item.prefill:
            keys, values = key[span], value[span]
            slots = attn_metadata.slot_mapping[item.start : item.start + item.after]
            idx = _guarded(
                item, layer_idx, keys.shape[1], _prefill_indices, item, query[span], keys, impl.scale
            )
        else:
            slots = _request_slots(attn_metadata.block_table[item.row], item.before + 1, kv_cache.shape[2])
            try:
                keys, values = read_cache(impl, layer, kv_cache, slots)
            except RuntimeError as err:  # an unreadable layout: the first ``after`` slots stay as they are
                _log_failure(track, layer_idx, err, "its oldest tokens")
                continue
            idx = _guarded(
                item, layer_idx, keys.shape[1], _reselect, track, window[-observed:], keys, impl.scale
            )
            slots = slots[: item.after]
        impl.do_kv_cache_update(
            layer,
            gather_tokens(keys, idx).to(key.dtype),
            gather_tokens(values, idx).to(value.dtype),
            kv_cache,
            slots,
        )


def _guarded(item: _Item, layer_idx: int, heads: int, select, *args) -> torch.Tensor:
    """``select(*args, layer_idx)``'s indices ``(kv_heads, after)``, or the most recent ``after``
    tokens when the press raises or keeps the wrong count (logged once per request)."""
    track, held = item.track, item.before + item.count
    if not track.failed:
        try:
            with torch.no_grad():
                idx = select(*args, layer_idx)
            if idx.shape[-1] != item.after:
                raise RuntimeError(f"it kept {idx.shape[-1]} tokens, not {item.after}")
            return idx
        except Exception as err:  # noqa: BLE001 (one request's fault must not take the engine down)
            _log_failure(track, layer_idx, err, "its most recent tokens")
    return torch.arange(held - item.after, held).expand(heads, -1)


def _log_failure(track: Track, layer_idx: int, err: Exception, instead: str) -> None:
    if not track.failed:
        logger.error(
            "clusterattn: request %s: decode eviction with %r failed at layer %d (%s: %s); the request "
            "keeps %s instead (the same count)",
            track.req_id, track.press, layer_idx, type(err).__name__, err, instead,
        )  # fmt: skip
    track.failed = True


def _reselect(track: Track, window, keys, scaling: float, layer_idx: int) -> torch.Tensor:
    """``(kv_heads, decode_budget)`` ascending indices into ``keys`` ``(n, kv_heads, head_dim)``, chosen
    by the wrapped press with ``window`` ``(<= w, q_heads, head_dim)`` as its queries."""
    fixed = track.fixed
    idx = select_kept(track.rule, window, keys[fixed:], scaling, layer=layer_idx, n_layers=track.n_layers)
    if idx is None:
        raise RuntimeError("the press kept every token")
    if fixed:
        head = torch.arange(fixed, device=idx.device).expand(idx.shape[0], -1)
        idx = torch.cat([head, idx + fixed], dim=-1)
    return idx


def _prefill_indices(item: _Item, query, key, scaling: float, layer_idx: int) -> torch.Tensor:
    """``(kv_heads, after)`` indices into a prefill's ``key`` ``(prompt_len + k, kv_heads, head_dim)``:
    the prompt's selection, the ``k`` earlier output tokens (after a preemption), and, where
    :func:`physical_length` says the request had re-selected, one re-selection at the last such point."""
    track = item.track
    prompt_len, heads = track.prompt_len, key.shape[1]
    if track.kept is None:
        idx = torch.arange(prompt_len).expand(heads, -1)
    else:
        idx = select_kept(track.press.press, query[:prompt_len], key[:prompt_len], scaling,
                          layer=layer_idx, n_layers=track.n_layers)  # fmt: skip
        if idx is None or idx.shape[-1] != track.kept:
            raise RuntimeError(f"the prompt's press did not keep {track.kept} tokens")
    generated = key.shape[0] - prompt_len
    idx = torch.cat([idx, torch.arange(prompt_len, key.shape[0]).expand(heads, -1)], dim=-1)
    if idx.shape[-1] > item.after:
        recent = item.after - track.press.budget  # tokens fed after the last re-selection point
        cut = idx.shape[-1] - recent
        point = prompt_len + generated - recent
        window = query[max(0, point - track.press.observed_queries) : point]
        chosen = _reselect(track, window, gather_tokens(key, idx[:, :cut]), scaling, layer_idx)
        idx = torch.cat([idx[:, :cut].gather(1, chosen), idx[:, cut:]], dim=-1)
    return idx


def _request_slots(blocks: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Cache slots ``(n,)`` of a request's physical positions ``0 .. n-1`` from its block-table row."""
    pos = torch.arange(n, device=blocks.device)
    return blocks[pos // block_size].to(torch.int64) * block_size + pos % block_size


def read_cache(impl, layer, kv_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(n, kv_heads, head_dim)`` held at ``slots`` ``(n,)`` of ``kv_cache``
    ``(blocks, kv_heads, block_size, 2 * head_dim)``, whatever the block interior's packing (see
    :func:`cache_layout`)."""
    blocks, heads, block_size, width = kv_cache.shape
    key_at, value_at = cache_layout(impl, layer, kv_cache)
    flat = kv_cache.view(blocks, heads, block_size * width)
    slots = slots.to(torch.int64)
    block, within = (slots // block_size)[:, None, None], slots % block_size
    head = torch.arange(heads)[None, :, None]
    return flat[block, head, key_at[within][:, None, :]], flat[block, head, value_at[within][:, None, :]]


def cache_layout(impl, layer, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's write op puts token ``t``'s element ``d`` inside one KV head's block: key and
    value offsets ``(block_size, head_dim)`` into the block's ``block_size * 2 * head_dim`` elements.

    Found once per layout by writing a probe block through the backend's own op
    (``do_kv_cache_update``; with some ISAs keys are stored transposed), so reading back never
    guesses. Raises ``RuntimeError`` if the probe does not come back exact (e.g. an fp8 cache).
    """
    _, _, block_size, width = kv_cache.shape
    dim = width // 2
    ident = (getattr(layer, "isa", None), kv_cache.dtype, block_size, width)
    if ident not in _LAYOUTS:
        tokens = torch.arange(block_size)[:, None].expand(-1, dim)
        dims = torch.arange(dim)[None, :].expand(block_size, -1)
        marker = torch.full((block_size, dim), -2)
        found = []
        for key_part, value_part in ((tokens, marker), (dims, marker), (marker, tokens), (marker, dims)):
            probe = torch.full((1, 1, block_size, width), -1, dtype=kv_cache.dtype)
            k, v = (part[:, None, :].to(kv_cache.dtype).contiguous() for part in (key_part, value_part))
            impl.do_kv_cache_update(layer, k, v, probe, torch.arange(block_size))
            found.append(probe.reshape(-1).to(torch.int64))
        _LAYOUTS[ident] = (_offsets(found[0], found[1], block_size, dim),
                           _offsets(found[2], found[3], block_size, dim))  # fmt: skip
    return _LAYOUTS[ident]


def _offsets(token_of: torch.Tensor, dim_of: torch.Tensor, block_size: int, dim: int) -> torch.Tensor:
    """``(block_size, dim)`` flat offsets from the probe's token and element at every offset."""
    where = (token_of >= 0).nonzero().squeeze(1)
    code = token_of[where] * dim + dim_of[where]
    if (
        where.numel() != block_size * dim
        or (dim_of[where] < 0).any()
        or code.unique().numel() != code.numel()
    ):
        raise RuntimeError("decode eviction cannot read this KV cache layout back (an fp8 or packed cache?)")
    out = torch.empty(block_size * dim, dtype=torch.int64)
    out[code] = where
    return out.view(block_size, dim)
