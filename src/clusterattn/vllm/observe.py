"""Watch a vLLM v1 scheduler from inside its process: the KV blocks each request holds while it
decodes, and the preemptions.

The plugin's promise under decode eviction is that a request's blocks never exceed what its budget
needs; this is how the vLLM tests (``tests_vllm/run_engine.py``) and the long-output serving bench
(``benchmarks/serving_long_output.py``) check it. It only wraps two scheduler methods and imports
nothing from vLLM, so it works in any process that holds the scheduler
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ``llm.llm_engine.engine_core.engine_core.scheduler``).
"""

from __future__ import annotations

__all__ = ["watch_blocks"]


def watch_blocks(scheduler) -> dict:
    """Wrap ``scheduler.update_from_output`` and ``scheduler._preempt_request``; returns the dict
    they keep up to date:

    - ``"max_decode_blocks"``: the most blocks one request held after a step in which it had
      decoded (its computed tokens past its prompt);
    - ``"last_blocks"``: request id -> the blocks it held after its last such step;
    - ``"preemptions"``: how many times the scheduler preempted a request.

    The blocks are those of the scheduler's first (and, for the models we serve, only) KV cache
    group."""
    seen: dict = {"max_decode_blocks": 0, "last_blocks": {}, "preemptions": 0}
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    update, preempt = scheduler.update_from_output, scheduler._preempt_request

    def update_from_output(*args, **kwargs):
        out = update(*args, **kwargs)
        for request in scheduler.running:
            if request.num_computed_tokens > request.num_prompt_tokens:  # decoded in this step or before
                held = len(manager.req_to_blocks.get(request.request_id, ()))
                seen["last_blocks"][request.request_id] = held
                seen["max_decode_blocks"] = max(seen["max_decode_blocks"], held)
        return out

    def preempt_request(*args, **kwargs):
        seen["preemptions"] += 1
        return preempt(*args, **kwargs)

    scheduler.update_from_output = update_from_output
    scheduler._preempt_request = preempt_request
    return seen
