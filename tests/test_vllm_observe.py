"""`clusterattn.vllm.observe.watch_blocks` on a stand-in scheduler (the vLLM suite runs it in an engine)."""

from __future__ import annotations

from types import SimpleNamespace

from clusterattn.vllm.observe import watch_blocks


def test_watch_blocks_counts_decode_blocks_and_preemptions():
    calls = []
    decoding = SimpleNamespace(request_id="a", num_computed_tokens=9, num_prompt_tokens=8)
    prefilling = SimpleNamespace(request_id="b", num_computed_tokens=8, num_prompt_tokens=8)
    manager = SimpleNamespace(req_to_blocks={"a": [0, 1, 2], "b": [3, 4, 5, 6, 7]})
    scheduler = SimpleNamespace(
        running=[decoding, prefilling],
        kv_cache_manager=SimpleNamespace(coordinator=SimpleNamespace(single_type_managers=[manager])),
        update_from_output=lambda *a, **k: calls.append(("update", a, k)) or "out",
        _preempt_request=lambda *a, **k: calls.append(("preempt", a, k)),
    )
    seen = watch_blocks(scheduler)
    assert scheduler.update_from_output(1, x=2) == "out"  # the original runs, its result passes through
    assert seen["max_decode_blocks"] == 3 and seen["last_blocks"] == {"a": 3}  # "b" has not decoded
    manager.req_to_blocks["a"] = [0, 1]  # evicted: fewer blocks after the next step
    scheduler.update_from_output()
    assert seen["max_decode_blocks"] == 3 and seen["last_blocks"] == {"a": 2}
    scheduler._preempt_request(decoding)
    assert seen["preemptions"] == 1
    assert [c[0] for c in calls] == ["update", "update", "preempt"] and calls[0][1:] == ((1,), {"x": 2})
