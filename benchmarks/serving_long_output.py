"""Long-output serving bench: concurrent 4k-token answers in a fixed KV space, with/without decode eviction.

    cd /work/main && PYTHONPATH=src TOKENIZERS_PARALLELISM=false nice -n 10 \\
        .venv-vllm/bin/python benchmarks/serving_long_output.py --requests 32

SmolLM2-135M (fp32) in vLLM on CPU, ``VLLM_CPU_KVCACHE_SPACE=--kv-gib``. Each configuration runs in
its own child engine (the plugin's press is the engine default, ``CLUSTERATTN_VLLM_PRESS``):

1. ``full``: no press (the plugin does nothing: stock vLLM, full cache);
2. ``prompt``: ``clusterattn:budget=256`` (the prompt compressed at prefill, the output kept whole);
3. ``d1024``: ``clusterattn:budget=256,decode_budget=1024,interval=128``;
4. ``d512``: ``clusterattn:budget=256,decode_budget=512,interval=128``.

``--requests`` random-token prompts of ``--prompt-len`` tokens are submitted at once, each asking for
exactly ``--new-tokens`` tokens (``min_tokens = max_tokens``: EOS suppressed), greedy. The scheduler
is observed from inside the child (``scheduler.schedule``, ``update_from_output`` and
``_preempt_request`` wrapped): the most requests running at once in a step that only decodes, the
most running at once that had already written half their output, preemptions, the blocks a request
holds while decoding, wall time and output tokens/s.

Writes ``<out>/results.json`` and ``<out>/README.md``; progress goes to stderr. A finished
configuration's figures are kept in ``<out>/<name>.tmp.json`` until the end, so an interrupted run
resumes where it stopped (with the same options).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import _prompts, _step_log  # noqa: E402  (benchmarks/ is not a package)

CONFIGS = {  # name: (label, CLUSTERATTN_VLLM_PRESS or None)
    "full": ("full cache (no press)", None),
    "prompt": ("prompt-only B=256", "clusterattn:budget=256"),
    "d1024": ("B=256, decode D=1024, I=128", "clusterattn:budget=256,decode_budget=1024,interval=128"),
    "d512": ("B=256, decode D=512, I=128", "clusterattn:budget=256,decode_budget=512,interval=128"),
}
EVICTING = ("d1024", "d512")
BASELINES = ("prompt", "full")
PROGRESS_EVERY_S = 30.0


class _TimeUp(Exception):
    """Raised inside ``scheduler.schedule`` when a configuration reaches ``--max-minutes``."""


def run_child(job: dict) -> dict:
    """Child process: one engine, ``job["requests"]`` long-output requests submitted at once."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler lives in this process
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from clusterattn.vllm.observe import watch_blocks

    max_len = job["prompt_len"] + job["new_tokens"]
    llm = LLM(
        model=job["model"], dtype=job["dtype"], enforce_eager=True, max_model_len=max_len,
        max_num_batched_tokens=max(4096, max_len), max_num_seqs=max(16, job["requests"]), seed=0,
        enable_prefix_caching=False, enable_chunked_prefill=False,
    )  # fmt: skip
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in _prompts(2, 64, seed=1)], warm, use_tqdm=False)

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    steps = _step_log(scheduler)  # (time, scheduled tokens, scheduled requests, running)
    half = job["new_tokens"] // 2
    seen = watch_blocks(scheduler)  # max_decode_blocks, last_blocks, preemptions
    seen.update(max_half=0, printed=0.0)
    start = time.perf_counter()
    logged = scheduler.schedule

    def schedule(*args, **kwargs):
        if job["max_s"] and time.perf_counter() - start > job["max_s"]:
            raise _TimeUp
        out = logged(*args, **kwargs)
        past_half = sum(1 for r in scheduler.running if r.num_output_tokens >= half)
        seen["max_half"] = max(seen["max_half"], past_half)
        now = time.perf_counter()
        if now - seen["printed"] >= PROGRESS_EVERY_S:
            seen["printed"] = now
            done = job["requests"] - len(scheduler.running) - len(scheduler.waiting)
            tokens = done * job["new_tokens"] + sum(r.num_output_tokens for r in scheduler.running)
            print(
                f"  [{job['name']}] {now - start:6.0f} s: {len(scheduler.running)} running, "
                f"{len(scheduler.waiting)} waiting, {done} done, "
                f"{tokens}/{job['requests'] * job['new_tokens']} tokens, "
                f"{seen['preemptions']} preemptions, {past_half} past half",
                file=sys.stderr,
                flush=True,
            )
        return out

    scheduler.schedule = schedule

    n = job["new_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts(job["requests"], job["prompt_len"], seed=7)]
    begin = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        lengths, stopped = [len(o.outputs[0].token_ids) for o in outputs], False
    except _TimeUp:  # the engine is left as it is: this process ends here
        pending = [*scheduler.running, *scheduler.waiting]
        done = job["requests"] - len(pending)
        lengths, stopped = [n] * done + [r.num_output_tokens for r in pending], True
    wall = time.perf_counter() - begin
    decode_steps = [s for s in steps if s[2] > 0 and s[1] == s[2]]  # every scheduled request decodes 1 token
    return {
        "requests": job["requests"],
        "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
        "block_size": scheduler.cache_config.block_size,
        "max_running_decode": max((s[3] for s in decode_steps), default=0),
        "max_running_any": max((s[3] for s in steps), default=0),
        "max_running_past_half": seen["max_half"],
        "mean_running_decode": sum(s[3] for s in decode_steps) / max(1, len(decode_steps)),
        "steps": len(steps),
        "decode_steps": len(decode_steps),
        "preemptions": seen["preemptions"],
        "max_decode_blocks": seen["max_decode_blocks"],
        "end_blocks_max": max(seen["last_blocks"].values(), default=0),
        "wall_s": wall,
        "output_tokens": sum(lengths),
        "tokens_per_s": sum(lengths) / wall,
        "all_full_length": all(x == n for x in lengths),
        "stopped_early": stopped,
        "finished": sum(x == n for x in lengths),
    }


def _child(args, name: str) -> dict:
    """One configuration in its own engine process (resumable: a finished one's figures are kept)."""
    label, spec = CONFIGS[name]
    requests = args.requests if name in EVICTING else args.baseline_requests or args.requests
    job = {
        "name": name, "model": args.model, "dtype": args.dtype, "requests": requests,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "kv_gib": args.kv_gib, "press": spec,
        "max_s": 60 * args.max_minutes,
    }  # fmt: skip
    out = Path(args.out) / f"{name}.tmp.json"
    if out.is_file():
        kept = json.loads(out.read_text())
        if kept.get("job") == job:
            print(f"== {name}: kept from {out}", file=sys.stderr, flush=True)
            return kept["result"]
    print(f"== {name}: {label}, {requests} requests", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERATTN_VLLM_PRESS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE=args.kv_gib)
    if spec is not None:
        env["CLUSTERATTN_VLLM_PRESS"] = spec
    job_file = Path(args.out) / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    raw = Path(args.out) / f"{name}.raw.json"
    command = [sys.executable, __file__, "--child", str(job_file), str(raw)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)  # vLLM's logs; progress: stderr
    result = json.loads(raw.read_text())
    job_file.unlink()
    raw.unlink()
    out.write_text(json.dumps({"job": job, "result": result}))
    r = result
    print(
        f"== {name}: max running {r['max_running_decode']} (decode steps), {r['max_running_past_half']} past "
        f"half, {r['preemptions']} preemptions, {r['wall_s']:.0f} s, {r['tokens_per_s']:.1f} tok/s",
        file=sys.stderr,
        flush=True,
    )
    return result


def _count(r: dict, key: str) -> str:
    """A concurrency figure, ``>= n`` when every submitted request was counted (a lower bound)."""
    return f"{'>= ' if r[key] == r['requests'] else ''}{r[key]}"


def table(results: dict, meta: dict) -> str:
    lines = [
        "| configuration | press (`CLUSTERATTN_VLLM_PRESS`) | requests (finished) | "
        "max running (decode steps) | "
        f"max running past {meta['new_tokens'] // 2} tokens | mean running (decode steps) | preemptions | "
        "blocks per request at the end (max) | wall s | output tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        label, spec = CONFIGS[name]
        lines.append(
            f"| {label} | {f'`{spec}`' if spec else '-'} | {r['requests']} ({r.get('finished', '-')}) | "
            f"{_count(r, 'max_running_decode')} | "
            f"{_count(r, 'max_running_past_half')} | {r['mean_running_decode']:.1f} | {r['preemptions']} | "
            f"{r['end_blocks_max']} | {r['wall_s']:.0f}{' (stopped)' if r.get('stopped_early') else ''} | "
            f"{r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def ratios(results: dict, meta: dict) -> list[str]:
    """ "concurrent long-output requests with decode eviction / without", per metric and baseline."""
    out = []
    metrics = {
        "max_running_decode": "max running (decode steps)",
        "max_running_past_half": f"max running past {meta['new_tokens'] // 2} tokens",
    }
    for name in EVICTING:
        for base in BASELINES:
            if name not in results or base not in results:
                continue
            parts = []
            for key, what in metrics.items():
                a, b = results[name][key], results[base][key]
                bound = " (lower bound: all submitted ran)" if a == results[name]["requests"] else ""
                full = b == results[base]["requests"]
                flag = " (baseline counted every request: not a real limit)" if full else ""
                value = a / b if b else float("nan")
                verdict = ">= 4x" if value >= 4 else "< 4x"
                parts.append(f"{what} {a}/{b} = {value:.2f}x{bound}{flag} ({verdict})")
            out.append(
                f"- concurrent long-output requests with decode eviction / without, "
                f"{CONFIGS[name][0]} vs {CONFIGS[base][0]}: " + "; ".join(parts)
            )
    return out


def document(results: dict, meta: dict) -> str:
    any_r = next(iter(results.values()))
    bounds = {
        name: math.ceil((int(spec.split("decode_budget=")[1].split(",")[0]) + 128) / any_r["block_size"])
        for name, (_, spec) in CONFIGS.items()
        if name in EVICTING and name in results
    }
    return "\n".join(
        [
            "# Long-output serving: concurrent 4k-token answers in 1 GiB of KV space",
            "",
            "Generated by `benchmarks/serving_long_output.py`; raw figures in `results.json`. Only measured "
            "figures; do not edit by hand.",
            "",
            f"- date: {meta['date']}; commit: `{meta['commit']}`{meta['dirty']}; machine: {meta['machine']}; "
            f"{meta['vllm']}, SmolLM2-135M, `--dtype {meta['dtype']}`, eager mode, prefix caching and "
            "chunked prefill off;",
            f"- `VLLM_CPU_KVCACHE_SPACE={meta['kv_gib']}`: {any_r['num_blocks']} blocks of "
            f"{any_r['block_size']} tokens ({any_r['num_blocks'] * any_r['block_size']} token slots per "
            "KV head and layer);",
            f"- random-token prompts of {meta['prompt_len']} tokens, `max_tokens = min_tokens = "
            f"{meta['new_tokens']}` (EOS suppressed: every request writes all {meta['new_tokens']} tokens), "
            "greedy, all requests submitted at once, each configuration in its own engine process, one after "
            f"another (total {meta['total_s'] / 60:.0f} minutes);",
            "- command: `" + meta["command"] + "`",
            "",
            "Columns: *max running (decode steps)*: the most requests in `scheduler.running` after a step in "
            "which every scheduled request decoded one token (no prefill); *max running past "
            f"{meta['new_tokens'] // 2} tokens*: the most running requests at once that had already written "
            "half their output (what stays in the KV space deep into a long answer); *mean running*: over "
            "the decode-only steps; *preemptions*: calls of `scheduler._preempt_request`; *blocks per "
            "request at the end*: the most blocks any request held after its last decoding step; `>= n`: "
            "every submitted request was counted (a lower bound); *wall s (stopped)*: the "
            "configuration reached `--max-minutes` and its requests were abandoned there (output tok/s: the "
            "tokens written until then over that time; blocks at the end: the last decoding step seen).",
            "",
            table(results, meta),
            "",
            *ratios(results, meta),
            "",
            *(
                f"- {CONFIGS[name][0]}: a decoding request may hold at most ceil(({name[1:]} + 128) / "
                f"{any_r['block_size']}) = {b} blocks; measured at most {results[name]['max_decode_blocks']} "
                "after any decode step."
                for name, b in bounds.items()
            ),
            *([f"- {meta['note']}"] if meta.get("note") else []),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=32,
        help="requests submitted at once (submit more than the decode-eviction engine can hold; default 32)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-requests", type=int, default=None,
        help="requests for the full-cache and prompt-only engines (default: --requests)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-len", type=int, default=2048, help="tokens per random prompt (default 2048)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=4096, help="tokens each request writes (min = max; default 4096)"
    )
    parser.add_argument("--kv-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE in GiB (default 1)")
    parser.add_argument(
        "--out", default="docs/serving-long-output", help="folder for README.md and results.json"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS)
    )
    parser.add_argument(
        "--max-minutes", type=float, default=0,
        help="stop a configuration's requests after this many minutes (0: run to the end); a stopped "
        "configuration reports what it measured until then",
    )  # fmt: skip
    parser.add_argument("--model", default=None, help="HF folder (default: the converted SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument(
        "--note", default="", help="a line added to the document (e.g. why --requests was reduced)"
    )
    parser.add_argument(
        "--from-results", action="store_true", help="only rewrite <out>/README.md from <out>/results.json"
    )
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_results:
        saved = json.loads(Path(args.out, "results.json").read_text())
        Path(args.out, "README.md").write_text(document(saved["results"], saved["meta"]))
        print(table(saved["results"], saved["meta"]))
        print("\n".join(ratios(saved["results"], saved["meta"])))
        return
    if args.child:
        job = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(run_child(job)))
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if args.model is None:
        from clusterattn.models import converted_dir, load_model

        if not (converted_dir("smollm2-135m") / "config.json").is_file():
            load_model("smollm2-135m")
        args.model = str(converted_dir("smollm2-135m"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    finished = {name: _child(args, name) for name in names}
    results = {name: finished[name] for name in CONFIGS if name in finished}  # table order
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    status = [*git, "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit.strip(),
        "dirty": " (with uncommitted changes in the working tree)" if dirty.stdout.strip() else "",
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "vllm": "vllm-cpu 0.32.0",
        "dtype": args.dtype, "kv_gib": args.kv_gib, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "total_s": time.perf_counter() - begin, "note": args.note,
        "command": "PYTHONPATH=src TOKENIZERS_PARALLELISM=false nice -n 10 .venv-vllm/bin/python "
        + shlex.join(["benchmarks/serving_long_output.py", *sys.argv[1:]]),
    }  # fmt: skip
    configs = {n: {"label": CONFIGS[n][0], "press": CONFIGS[n][1]} for n in names}
    Path(args.out, "results.json").write_text(
        json.dumps({"meta": meta, "configs": configs, "results": results}, indent=1) + "\n"
    )
    Path(args.out, "README.md").write_text(document(results, meta))
    for tmp in Path(args.out).glob("*.tmp.json"):
        tmp.unlink()
    print(table(results, meta))
    print("\n".join(ratios(results, meta)))


if __name__ == "__main__":
    main()
