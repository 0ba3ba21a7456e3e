"""Long-output serving bench: concurrent 4k-token answers in a fixed KV space, with/without decode eviction.

    PYTHONPATH=src TOKENIZERS_PARALLELISM=false nice -n 10 \\
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
most running at once that had already written half and three quarters of their output, preemptions,
the blocks a request holds while decoding, wall time and output tokens/s. From the most blocks a
request may hold (the prompt and the whole output; the prompt's budget and the output; the decode
budget and interval) and the most it held, the report (``serving_long_output_report.py``) derives
how many requests fit in the KV space for a whole answer, the figure the configurations are
compared on.

Writes ``<out>/results.json`` and ``<out>/README.md``; progress goes to stderr. A finished
configuration's figures are kept in ``<out>/<name>.tmp.json`` until the end, so an interrupted run
resumes where it stopped (with the same options). Configurations not named in ``--configs`` are
kept from an earlier ``<out>/results.json`` made with the same model, lengths and KV space (each
result records its own date and commit), so one configuration can be added or rerun alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import _prompts, _step_log  # noqa: E402  (benchmarks/ is not a package)
from serving_long_output_report import CONFIGS, EVICTING, document, ratios, table  # noqa: E402

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
    half, late = job["new_tokens"] // 2, 3 * job["new_tokens"] // 4
    seen = watch_blocks(scheduler)  # max_decode_blocks, last_blocks, preemptions
    seen.update(max_half=0, max_late=0, printed=0.0)
    start = time.perf_counter()
    logged = scheduler.schedule

    def schedule(*args, **kwargs):
        if job["max_s"] and time.perf_counter() - start > job["max_s"]:
            raise _TimeUp
        out = logged(*args, **kwargs)
        past_half = sum(1 for r in scheduler.running if r.num_output_tokens >= half)
        seen["max_half"] = max(seen["max_half"], past_half)
        past_late = sum(1 for r in scheduler.running if r.num_output_tokens >= late)
        seen["max_late"] = max(seen["max_late"], past_late)
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
        "max_running_past_three_quarters": seen["max_late"],
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


def _child(args, name: str, stamp: dict) -> dict:
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
    result = {**json.loads(raw.read_text()), **stamp}  # stamp: this run's date, commit and command
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


SETTINGS = ("dtype", "kv_gib", "prompt_len", "new_tokens")


def earlier_results(path: Path, meta: dict, keep: set[str]) -> dict:
    """The results of configurations ``keep`` from an earlier ``results.json`` made with the same
    settings (model, dtype, KV space, lengths), each stamped with its run's date, commit, command and
    note (older files kept those once, in their ``meta``). Nothing when the settings differ."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    old = saved["meta"]
    models = {old.get("model"), meta.get("model")} - {None}  # files before the model was recorded: none
    same = all(old[k] == meta[k] for k in SETTINGS) and len(models) <= 1
    if not same:
        print(f"== {path}: other settings, its results are not kept", file=sys.stderr, flush=True)
        return {}
    stamp = {k: old.get(k, "") for k in ("date", "commit", "command", "note")}
    return {name: {**stamp, **r} for name, r in saved["results"].items() if name in keep}


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
        "--note",
        default="",
        help="a remark kept with this run's results and shown in its command line (e.g. what else ran)",
    )
    parser.add_argument(
        "--from-results", action="store_true", help="only rewrite <out>/README.md from <out>/results.json"
    )
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_results:
        saved = json.loads(Path(args.out, "results.json").read_text())
        results = earlier_results(Path(args.out, "results.json"), saved["meta"], keep=set(CONFIGS))
        Path(args.out, "README.md").write_text(document(results, saved["meta"]))
        print(table(results, saved["meta"]))
        print("\n".join(ratios(results, saved["meta"])))
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
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    status = [*git, "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    stamp = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.strip() + (" (with uncommitted changes)" if dirty else ""),
        "command": "PYTHONPATH=src TOKENIZERS_PARALLELISM=false nice -n 10 .venv-vllm/bin/python "
        + shlex.join(["benchmarks/serving_long_output.py", *sys.argv[1:]]),
        "note": args.note,
    }
    meta = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "vllm": "vllm-cpu 0.32.0",
        "model": args.model, "dtype": args.dtype, "kv_gib": args.kv_gib, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }  # fmt: skip
    finished = earlier_results(Path(args.out, "results.json"), meta, keep=set(CONFIGS) - set(names))
    finished.update({name: _child(args, name, stamp) for name in names})
    results = {name: finished[name] for name in CONFIGS if name in finished}  # table order
    configs = {n: {"label": CONFIGS[n][0], "press": CONFIGS[n][1]} for n in results}
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
