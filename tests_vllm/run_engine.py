"""Run one vLLM engine (in this process) on token prompts and write the outputs as JSON.

Used by the tests as a subprocess, so every engine starts from a clean interpreter with its own
environment (plugin on or off). Input (first argument): a JSON file ``{"engine": {LLM kwargs},
"prompts": [[ids]], "presses": [spec, null or false], "max_tokens": n, "preempt_at_step": k}``
(false: no extra_args; the last key is optional and preempts every running request before step
k). Optional too: ``"failing_budget": b`` makes every press with budget ``b`` raise inside the
engine (a fault on purpose), ``"rounds": r`` sends the prompts ``r`` times, one after another,
``"min_tokens": n`` suppresses EOS for the first ``n`` tokens (as transformers' ``min_new_tokens``).
Output (second argument): ``{"tokens": [[ids]] (the first round), "rounds": [[[ids]]],
"max_running": n, "freed_blocks": n, "preemptions": n, "num_blocks": n, "free_blocks_end": n,
"max_decode_blocks": n}`` (the most blocks the scheduler held for one request after a step in
which it decoded).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler lives in this process


def main(path: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from clusterattn.vllm.observe import watch_blocks

    job = json.loads(pathlib.Path(path).read_text())
    if job.get("failing_budget") is not None:
        from clusterattn.presses.base import BasePress

        select = BasePress.select

        def failing(self, *args, **kwargs):
            if self.budget == job["failing_budget"]:
                raise RuntimeError("a press that fails on purpose")
            return select(self, *args, **kwargs)

        BasePress.select = failing
    engine = {"enforce_eager": True, "enable_prefix_caching": False, "seed": 0, **job["engine"]}
    llm = LLM(**engine)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    seen = watch_blocks(scheduler)
    seen["max_running"] = 0
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        seen["steps"] = seen.get("steps", 0) + 1
        if seen["steps"] == job.get("preempt_at_step"):  # every running request back to waiting
            scheduler.reset_prefix_cache(reset_running_requests=True)
        out = original(*args, **kwargs)
        seen["max_running"] = max(seen["max_running"], len(scheduler.running))
        return out

    scheduler.schedule = schedule
    params = []
    for spec in job["presses"]:
        extra = None if spec is False else {"clusterattn_press": spec}
        params.append(
            SamplingParams(
                temperature=0.0,
                max_tokens=job["max_tokens"],
                min_tokens=job.get("min_tokens", 0),
                extra_args=extra,
            )
        )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    rounds = [
        [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        for _ in range(job.get("rounds", 1))
    ]
    result = {
        "tokens": rounds[0],
        "rounds": rounds,
        "max_running": seen["max_running"],
        "freed_blocks": getattr(scheduler, "clusterattn_freed_blocks", 0),
        "preemptions": seen["preemptions"],
        "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
        "free_blocks_end": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        "max_decode_blocks": seen["max_decode_blocks"],
    }
    pathlib.Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
