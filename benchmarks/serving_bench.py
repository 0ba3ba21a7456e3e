"""Serving benchmark: stock vLLM (full cache) vs the clusterattn plugin, SmolLM2-135M on CPU.

    make serving-bench      # = .venv-vllm/bin/python benchmarks/serving_bench.py --out docs/serving

For each configuration (full cache with the plugin off; ClusterAttn at B=256 and B=512) one engine
runs in its own process with ``VLLM_CPU_KVCACHE_SPACE`` fixed, and measures on random-token prompts
of 2k and 4k tokens (two engines per configuration):

- decode tokens/s at batch 1 and 8 (in ``--decode-kv-gib``, 3 GiB: room for 8 full 4k
  requests): the batch size over the median wall time of the engine steps in which exactly that
  many requests decode and nothing prefills (64 new tokens per request, EOS ignored; the median
  resists the other processes of a shared machine);
- concurrency: ``--probe`` requests of 4k tokens submitted at once; the largest number that the
  scheduler ever holds running together (the KV space is the only limit).

Writes ``<out>.json`` (raw figures) and ``<out>.md`` (the table in docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

LENGTHS = (2048, 4000)  # 4k: leaves room for 64 new tokens inside max_model_len=4096
NEW_TOKENS = 64
CONFIGS = {
    "full": None,
    "ClusterAttn B=256": "clusterattn:budget=256",
    "ClusterAttn B=512": "clusterattn:budget=512",
}
# Stock vLLM decoding after prompts of exactly B tokens: what a B-token cache costs per step with no
# plugin at all, the reference for how much of the full cache's decode cost eviction can remove.
REFERENCE = "reference"
REFERENCE_LENGTHS = (256, 512)


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(count)]


def run_engine(model: str, probe: int, lengths: tuple[int, ...] = LENGTHS, dtype: str = "float32") -> dict:
    """Child process: one engine, every measurement; returns the figures."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model, dtype=dtype, enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096, seed=0,
        enable_prefix_caching=False, enable_chunked_prefill=False,
    )  # fmt: skip
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    steps: list[tuple[float, int, int]] = []  # (start time, scheduled tokens, scheduled requests)
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        steps.append((time.perf_counter(), out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out

    scheduler.schedule = schedule
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def decode_rate(prompts: list[list[int]]) -> float:
        steps.clear()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        steps.append((time.perf_counter(), 0, 0))
        batch = len(prompts)
        times = [
            end - start
            for (start, n_tokens, n_reqs), (end, _, _) in zip(steps, steps[1:], strict=False)
            if n_reqs == batch and n_tokens == batch  # pure decode, whole batch
        ]
        return batch / statistics.median(times) if times else float("nan")

    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in _prompts(8, 512, seed=1)], warm, use_tqdm=False)
    result: dict = {"decode": {}, "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks}
    for length in lengths if probe == 0 else ():  # decode part (probe 0) or concurrency part
        for batch in (1, 8):
            rate = decode_rate(_prompts(batch, length, seed=length + batch))
            result["decode"][f"{length}x{batch}"] = rate
            print(f"decode L={length} batch={batch}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    running = {"max": 0}

    def count(*args, **kwargs):
        out = schedule(*args, **kwargs)
        running["max"] = max(running["max"], len(scheduler.running))
        return out

    if probe == 0:
        return result
    scheduler.schedule = count
    llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in _prompts(probe, lengths[-1], seed=7)],
        SamplingParams(temperature=0.0, max_tokens=probe + 16, ignore_eos=True),
        use_tqdm=False,
    )
    result["max_running_4k"] = running["max"]
    result["probe"] = probe
    print(f"concurrent 4k requests: {running['max']} of {probe}", file=sys.stderr, flush=True)
    return result


def _table(results: dict, kv_gib: str, lengths: tuple[int, ...] = LENGTHS) -> str:
    full = results["full"]
    lines = [
        f"| press | decode tok/s, 2k, batch 1 | batch 8 | decode tok/s, 4k, batch 1 | batch 8 "
        f"| concurrent 4k requests in {kv_gib} GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        if name == REFERENCE:
            continue
        d, fd = res["decode"], full["decode"]
        cells = []
        for length in lengths:
            for batch in (1, 8):
                key = f"{length}x{batch}"
                ratio = "" if name == "full" else f" ({d[key] / fd[key]:.2f}x)"
                cells.append(f"{d[key]:.1f}{ratio}")
        conc = res["max_running_4k"]
        bound = ">= " if conc == res["probe"] else ""
        ratio = "" if name == "full" else f" ({conc / full['max_running_4k']:.1f}x)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {bound}{conc}{ratio} |")
    return "\n".join(lines)


def _targets(results: dict, lengths: tuple[int, ...]) -> list[str]:
    full, out = results["full"], []
    for name, res in results.items():
        if name in ("full", REFERENCE):
            continue
        speeds = {n: res["decode"][f"{n}x8"] / full["decode"][f"{n}x8"] for n in lengths}
        speed = min(speeds.values())
        conc = res["max_running_4k"] / full["max_running_4k"]
        bound = (
            " (a lower bound: every probe request ran at once)"
            if res["max_running_4k"] == res["probe"]
            else ""
        )
        out.append(
            f"- {name}: batch-8 decode "
            + ", ".join(f"{speeds[n]:.2f}x full at {n} tokens" for n in lengths)
            + " (target >= 2.6x: "
            f"{'met' if speed >= 2.6 else 'missed'}); concurrent 4k requests {conc:.1f}x full{bound} "
            f"(target >= 4x: {'met' if conc >= 4 else 'missed'})."
        )
    return out


def _document(table: str, results: dict, meta: dict, lengths: tuple[int, ...]) -> str:
    blocks = results["full"]["num_blocks"]
    plugin_probe = max(r["probe"] for n, r in results.items() if n not in ("full", REFERENCE))
    return "\n".join(
        [
            "# Serving benchmark: ClusterAttn inside vLLM",
            "",
            "Generated by `make serving-bench` (`benchmarks/serving_bench.py`); raw figures in",
            "`docs/serving.json`. Do not edit by hand.",
            "",
            f"SmolLM2-135M-Instruct, {meta['vllm']}, {meta['dtype']}, {meta['machine']}, "
            f"`VLLM_CPU_KVCACHE_SPACE={meta['kv_gib']}` ({blocks} blocks of 128 tokens) for the concurrency "
            f"count and {meta['decode_kv_gib']} for the decode runs, eager mode, "
            f"prefix caching and chunked prefill off in every engine, {meta['date']}. Random-token prompts "
            f"of {' and '.join(map(str, lengths))} tokens; {meta['new_tokens']} new tokens per request, EOS "
            "ignored. *full* is stock vLLM (the plugin not loaded); ClusterAttn rows run the plugin "
            "(`CLUSTERATTN_VLLM_PRESS=clusterattn:budget=B`).",
            "",
            "- decode tok/s: batch size over the median wall time of the engine steps in which exactly 1 "
            "(or 8) requests decode and nothing prefills (after a warm-up generation);",
            "- concurrent 4k requests: the most requests the scheduler held running at once when "
            f"{results['full']['probe']} (full) or {plugin_probe} (plugin) "
            f"requests of {lengths[-1]} tokens were submitted together (the KV "
            "space is the only limit; with eviction a request needs its full prompt's blocks only during "
            "its own prefill step).",
            "",
            table,
            "",
            *_targets(results, lengths),
            "",
            *_reference(results, lengths),
        ]
    )


def _reference(results: dict, lengths: tuple[int, ...]) -> list[str]:
    """The reference table: stock vLLM decoding after B-token prompts, against full and plugin."""
    if REFERENCE not in results:
        return []
    reference, full = results[REFERENCE]["decode"], results["full"]["decode"]
    lines = [
        "## Reference: stock vLLM after prompts of B tokens",
        "",
        "Stock vLLM (plugin off) decoding after random prompts of exactly B tokens, in the same "
        "decode KV space: what a B-token cache costs per step without any eviction. reference / full "
        "is the speed-up eviction to B tokens would give if it cost exactly that; plugin / reference "
        "at or above 1 means the plugin decodes as fast as a B-token prompt does, so a batch-8 ratio "
        "below the target is set by the model's own step cost on this machine, not by the eviction.",
        "",
        "| B | tok/s, batch 1 | batch 8 | "
        + " | ".join(
            f"reference / full, {n} tokens, batch 8 | plugin / reference, {n}, batch 8" for n in lengths
        )
        + " |",
        "|---|---|---|" + "---|---|" * len(lengths),
    ]
    for budget in REFERENCE_LENGTHS:
        plugin = results.get(f"ClusterAttn B={budget}", {}).get("decode", {})
        top = reference[f"{budget}x8"]
        cells = [f"{reference[f'{budget}x1']:.1f}", f"{top:.1f}"]
        for n in lengths:
            cells.append(f"{top / full[f'{n}x8']:.2f}x")
            cells.append(f"{plugin[f'{n}x8'] / top:.2f}" if f"{n}x8" in plugin else "-")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _child(args, out: Path, spec: str | None, probe: int, kv_gib: str, lengths) -> dict:
    """One engine in its own process (plugin on with ``spec``, off with None); its figures."""
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERATTN_VLLM_PRESS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE=kv_gib)
    if spec:
        env["CLUSTERATTN_VLLM_PRESS"] = spec
    command = [sys.executable, __file__, "--model", args.model, "--probe", str(probe), "--child", str(out)]
    command += ["--lengths", *map(str, lengths), "--dtype", args.dtype]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the converted SmolLM2)")
    parser.add_argument("--out", default="docs/serving")
    parser.add_argument("--kv-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE of the concurrency count")
    parser.add_argument("--decode-kv-gib", default="3", help="VLLM_CPU_KVCACHE_SPACE of the decode runs")
    parser.add_argument("--probe", type=int, default=24, help="4k requests submitted (concurrency, plugin)")
    parser.add_argument("--full-probe", type=int, default=10, help="the same for the full cache")
    parser.add_argument("--dtype", default="float32", help="float32: these AVX2 CPUs have no bf16 units")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", default=None, help="measure these configurations only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child).write_text(
            json.dumps(run_engine(args.model, args.probe, tuple(args.lengths), args.dtype))
        )
        return
    if args.model is None:
        from clusterattn.models import converted_dir, load_model

        if not (converted_dir("smollm2-135m") / "config.json").is_file():
            load_model("smollm2-135m")
        args.model = str(converted_dir("smollm2-135m"))
    results = {}
    reference_file = Path(f"{args.out}.{REFERENCE}.tmp.json")
    if reference_file.is_file():
        results[REFERENCE] = json.loads(reference_file.read_text())
    elif not args.only or REFERENCE in args.only:
        print(f"== {REFERENCE}", file=sys.stderr, flush=True)
        results[REFERENCE] = _child(args, reference_file, None, 0, args.decode_kv_gib, REFERENCE_LENGTHS)
    for name, spec in CONFIGS.items():
        child = Path(f"{args.out}.{name.replace(' ', '_').replace('=', '')}.tmp.json")
        if child.is_file():  # measured by an earlier, interrupted or partial (--only) run
            results[name] = json.loads(child.read_text())
            continue
        if args.only and name not in args.only:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        merged: dict = {}
        # Decode speed in a KV space where 8 full 4k requests fit; concurrency in the fixed one.
        for probe, kv_gib in (
            (0, args.decode_kv_gib),
            (args.probe if spec else args.full_probe, args.kv_gib),
        ):
            part = _child(args, child, spec, probe, kv_gib, args.lengths)
            merged = {**merged, **part, "decode": {**merged.get("decode", {}), **part["decode"]}}
        child.write_text(json.dumps(merged))
        results[name] = merged
    if set(results) != {*CONFIGS, REFERENCE}:
        return  # --only: the figures wait in the .tmp.json files for the run that writes the document
    meta = {
        "vllm": "vllm-cpu 0.32.0", "dtype": args.dtype,
        "kv_gib": args.kv_gib, "decode_kv_gib": args.decode_kv_gib, "new_tokens": NEW_TOKENS,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    for name in CONFIGS:
        Path(f"{args.out}.{name.replace(' ', '_').replace('=', '')}.tmp.json").unlink()
    reference_file.unlink()
    table = _table(results, args.kv_gib, tuple(args.lengths))
    Path(f"{args.out}.md").write_text(_document(table, results, meta, tuple(args.lengths)))
    print(table)


if __name__ == "__main__":
    main()
