"""Speed and memory measurement (``clusterattn bench``): prefill, compression overhead, decode
latency, KV bytes, peak memory and throughput under a memory cap, full cache and presses side by
side in one run. Each configuration runs in a fresh process (``python -m clusterattn.bench CASE``)
so peak memory is its own.

glibc's malloc by default raises its mmap threshold as large blocks are freed and then keeps freed
prefill activations in its heap, so one configuration's peak RSS swung by up to 0.5 GB between
identical runs at 16k. Fixed at 128 KiB (glibc's starting value, ``MALLOC_MMAP_THRESHOLD_``),
freed blocks go back to the system and the peak is reproducible, but every large allocation then
faults in fresh pages, which slows the full cache's decode most (its growing cache holds the
largest blocks). So each case runs twice: timed under the environment's malloc
(``mmap_threshold``, default 0), and once more with the threshold fixed (``rss_mmap_threshold``,
default 131072) for its peak RSS. Tables show both peaks.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from clusterattn.bench_case import (  # noqa: F401 (re-exported)
    CachePeak,
    Case,
    _allocated,
    _load,
    _peak_allocated,
    make_press,
    peak_rss_bytes,
    prompt_inputs,
    reset_peak_rss,
    rss_bytes,
)
from clusterattn.bench_floor import copy_bandwidth, floor_ms, matvec_ms, weight_bytes
from clusterattn.bench_report import markdown, plot, ratio_rows, write_report  # noqa: F401 (re-exported)
from clusterattn.bench_selection import selection_markdown, selection_timing  # noqa: F401 (re-exported)
from clusterattn.compiled import compiled_greedy_decode, static_cache, static_prompt_bytes
from clusterattn.hf import kv_bytes, new_cache
from clusterattn.steps import greedy_decode, prefill
from clusterattn.timing import synchronize


@torch.no_grad()
def measure(case: Case) -> dict:
    """Run ``case`` in this process; medians over ``case.repeats``."""
    return measure_model(*_load(case), case)


@torch.no_grad()
def measure_model(model, tokenizer, case: Case, ids: torch.Tensor | None = None) -> dict:
    """Measure ``case`` on a loaded model (on CPU or CUDA alike, prompts on the model's device);
    ``ids`` as in :func:`prompt_inputs`. Medians over ``case.repeats``.

    Times are wall clock with the device synchronised. ``peak_kv_bytes`` is sampled per layer during
    prefill; on CUDA ``peak_device_bytes`` is the allocator's peak over prefill and decode, and
    ``device_before_bytes`` what was allocated before (the weights).
    """
    press = make_press(case.press, case.budget, case.decode_budget, case.interval)
    device = next(model.parameters()).device
    inputs = prompt_inputs(tokenizer, case.length, case.batch, device, ids)
    runs = []
    for repeat in range(case.repeats + (case.compile is not None)):  # a compiled step: one warm-up
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base, device_base = rss_bytes(), _allocated(device)
        reset_peak_rss()
        # registered before the press (sees each full layer before the swap), removed after prefill
        tracker = CachePeak(model)
        if case.compile is not None:  # a static cache carries its press
            cache = static_cache(model, press, case.length + case.new_tokens)
            context = contextlib.nullcontext()
        else:
            cache = new_cache(model)
            context = press(model) if press is not None else contextlib.nullcontext()
        with context as session:
            try:
                synchronize(device)
                start = time.perf_counter()
                logits, next_pos = prefill(model, inputs, cache, chunk=case.prefill_chunk)
                synchronize(device)
                total = time.perf_counter() - start
            finally:  # a failed case leaves no hooks on a model that later cases reuse
                tracker.close()
            stats = session.stats if session is not None else getattr(cache, "stats", None)
            compress = stats.seconds if stats is not None else 0.0
            held = (
                kv_bytes if case.compile is None else static_prompt_bytes
            )  # a static cache: its filled part
            kv = held(cache)
            kept = max(stats.kept_tokens.values(), default=case.length) if stats else case.length
            decode = (
                greedy_decode
                if case.compile is None
                else partial(compiled_greedy_decode, backend=case.compile)
            )
            _, _, decode_s = decode(
                model, tokenizer, inputs, cache, logits, next_pos, max_new_tokens=case.new_tokens,
                ignore_eos=True,
            )  # fmt: skip
        steps = case.new_tokens - 1
        final = held(cache)
        if case.compile is None or repeat > 0:
            runs.append({
                "prefill_s": total - compress, "compress_s": compress, "kv_bytes": kv, "kept_tokens": kept,
                "decode_ms_per_token": 1000 * decode_s / steps,
                "decode_tokens_per_s": case.batch * steps / decode_s,
                "peak_kv_bytes": tracker.peak, "peak_rss_bytes": peak_rss_bytes(), "rss_before_bytes": base,
                "peak_device_bytes": _peak_allocated(device), "device_before_bytes": device_base,
                "step_cache_bytes": (kv + final) / 2,  # the mean cache a decode step reads
                "final_kv_bytes": final,
                "decode_compressions": stats.decode_compressions if stats else 0,
                "decode_compress_s": stats.decode_seconds if stats else 0.0,
            })  # fmt: skip
        del cache, logits
    row = asdict(case)
    for key in runs[0]:
        row[key] = statistics.median(r[key] for r in runs)
    row["compress_share"] = row["compress_s"] / (row["prefill_s"] + row["compress_s"])
    row["peak_rss_above_model_bytes"] = row["peak_rss_bytes"] - row["rss_before_bytes"]
    # the bandwidth floor, measured after the runs (its buffers would count in their peak memory)
    row["weight_bytes"] = weight_bytes(model)
    row["copy_bandwidth"] = copy_bandwidth(device)
    row["floor_ms_per_token"] = floor_ms(row["weight_bytes"], row["step_cache_bytes"], row["copy_bandwidth"])
    row["decode_vs_floor"] = row["decode_ms_per_token"] / row["floor_ms_per_token"]
    row["matvec_ms_per_token"] = matvec_ms(model)  # what the device's GEMV kernels need for the weights
    row["decode_vs_matvec"] = row["decode_ms_per_token"] / row["matvec_ms_per_token"]
    return row


def throughput(case: Case, cap_bytes: int, max_batch: int = 1024) -> dict:
    """:func:`throughput_model` on ``case.model`` loaded in this process."""
    return throughput_model(*_load(case), case, cap_bytes, max_batch)


@torch.no_grad()
def throughput_model(model, tokenizer, case: Case, cap_bytes: int, max_batch: int = 1024, ids=None) -> dict:
    """Largest batch of ``case.length``-token prompts whose decode fits ``cap_bytes`` of memory
    (process RSS on CPU, the allocator's tensors on CUDA), and the decode tokens/s it reaches.

    Prompts are prefilled one at a time (as serving engines schedule long prompts); since they are
    equal-length copies, one prefilled (and compressed) cache is replicated to the batch, which has
    exactly the shapes and decode work of distinct prompts. The batch is sized from the measured
    memory left after the model, then decoded for real, and its peak is reported against the cap.
    On CUDA one unmeasured decode comes first (then the cache is cropped back to the prompt), so the
    timed one finds the caching allocator warm for the growing cache, as a serving engine's would be.
    """
    press = make_press(case.press, case.budget)
    device = next(model.parameters()).device
    one = prompt_inputs(tokenizer, case.length, 1, device, ids)
    used = (lambda: _allocated(device)) if device.type == "cuda" else rss_bytes
    peak = (lambda: _peak_allocated(device)) if device.type == "cuda" else peak_rss_bytes
    cache = new_cache(model)
    context = press(model) if press is not None else contextlib.nullcontext()
    with context:
        logits, next_pos = prefill(model, one, cache)
        per_token = sum(
            2 * layer.keys[:, :, :1].numel() * layer.keys.element_size() for layer in cache.layers
        )
        seq_bytes = kv_bytes(cache) + case.new_tokens * per_token
        gc.collect()
        base = used() - kv_bytes(cache)
        batch = int(min(max_batch, (0.9 * cap_bytes - base) // seq_bytes))
        if batch < 1:
            raise ValueError(f"cap of {cap_bytes} bytes leaves no room for one sequence")
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)
        inputs = prompt_inputs(tokenizer, case.length, batch, device, ids)
        reset_peak_rss()
        logits, next_pos = logits.repeat(batch, 1, 1), next_pos.repeat(batch)
        decode = functools.partial(
            greedy_decode, model, tokenizer, inputs, cache, logits, next_pos,
            max_new_tokens=case.new_tokens, ignore_eos=True,
        )  # fmt: skip
        if device.type == "cuda":  # warm the allocator for the growing cache's sizes, then crop back
            prompt = [layer.keys.shape[2] for layer in cache.layers]
            decode()
            for layer, width in zip(cache.layers, prompt, strict=True):
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
            torch.cuda.reset_peak_memory_stats(device)
        _, _, decode_s = decode()
    steps = case.new_tokens - 1
    return {
        **asdict(case), "cap_bytes": cap_bytes, "max_batch": batch, "sequence_kv_bytes": seq_bytes,
        "decode_tokens_per_s": batch * steps / decode_s, "decode_ms_per_step": 1000 * decode_s / steps,
        "peak_bytes": peak(), "peak_rss_bytes": peak_rss_bytes(), "fits": peak() <= cap_bytes,
    }  # fmt: skip


MMAP_THRESHOLD = 0
"""Default glibc mmap threshold (bytes) of the bench's timed case processes: 0, the environment's
setting (glibc's dynamic threshold). 131072 makes peak RSS reproducible at some cost in time."""

RSS_MMAP_THRESHOLD = 131072
"""Default glibc mmap threshold (bytes) of the extra peak-RSS process of each case: glibc's starting
value, so that freed blocks go back to the system (0: no extra process)."""


def _check_mmap_threshold(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"mmap_threshold must be an int >= 0 (bytes; 0: the environment's setting), got {value!r}"
        )


def run_isolated(
    case: Case, timeout: float = 3600, cap_bytes: int | None = None, mmap_threshold: int = MMAP_THRESHOLD
) -> dict:
    """``measure(case)`` (or ``throughput`` with a cap) in a fresh Python process, with glibc's mmap
    threshold fixed at ``mmap_threshold`` bytes (0: the environment's setting, glibc's dynamic
    threshold unless ``MALLOC_MMAP_THRESHOLD_`` is set). The row records the value used."""
    _check_mmap_threshold(mmap_threshold)
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    job = {"case": asdict(case), "cap_bytes": cap_bytes}
    proc = subprocess.run(
        [sys.executable, "-m", "clusterattn.bench", json.dumps(job)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bench case {case} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return row | {"malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_", "glibc default")}


def run_bench(
    *, models, lengths, presses, budgets, batches=(1,), new_tokens=32, repeats=3, threads=2,
    throughput_lengths=(), cap_gb=8.0, out_dir="runs/bench", mmap_threshold=MMAP_THRESHOLD,
    rss_mmap_threshold=RSS_MMAP_THRESHOLD, decodes=(None,), prefill_chunks=(None,), decode_budgets=(None,),
    interval=128,
) -> dict:  # fmt: skip
    """The whole grid, each case in a fresh process (``mmap_threshold``: see :func:`run_isolated`);
    writes bench.json, bench.md and bench.png.

    With ``rss_mmap_threshold`` > 0, each case runs once more (one repeat) in a fresh process with
    glibc's mmap threshold fixed there, and that process's peak RSS is recorded beside the timed
    process's (``peak_rss_fixed_mmap_bytes``): reproducible peak memory, while every time comes from
    the process with ``mmap_threshold`` (by default the environment's malloc, where a fixed
    threshold would slow the full cache's decode most, its growing cache being the largest blocks).
    ``decodes``: the decode paths, each a set of cases (None: eager; a backend name: compiled, see
    :class:`Case`); ``prefill_chunks``: the prefill's chunks (tokens per layer call), each a set of
    cases (None: one pass);
    ``decode_budgets``: each a set of cases whose presses also compress while decoding
    (``DecodingPress`` with ``interval``; None: the prompt only; the full cache runs once).
    """
    from tqdm import tqdm

    for name in presses:
        make_press(name, budgets[0] if budgets else None)  # bad names fail before any model loads
    _check_mmap_threshold(mmap_threshold)
    _check_mmap_threshold(rss_mmap_threshold)
    for kept in decode_budgets:  # checked even when only the full cache runs (which ignores them)
        if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int) or kept < 1):
            raise ValueError(f"decode budgets must be ints >= 1 (or None), got {kept!r}")
    cases = [
        Case(model, length, name, None if name == "full" else budget, batch, new_tokens, repeats, threads,
             prefill_chunk=chunk, compile=decode, decode_budget=kept, interval=interval)
        for model in models for length in lengths for batch in batches for decode in decodes
        for chunk in prefill_chunks for name in presses for budget in ([None] if name == "full" else budgets)
        for kept in ([None] if name == "full" else decode_budgets)
    ]  # fmt: skip
    out = Path(out_dir)  # every case is validated above, before any folder or model
    out.mkdir(parents=True, exist_ok=True)
    isolated = functools.partial(run_isolated, mmap_threshold=mmap_threshold)
    rows = [isolated(case) for case in tqdm(cases, desc="bench cases", unit="case")]
    if rss_mmap_threshold:
        for row, case in zip(
            rows, tqdm(cases, desc="peak RSS, fixed mmap threshold", unit="case"), strict=True
        ):
            fixed = run_isolated(replace(case, repeats=1), mmap_threshold=rss_mmap_threshold)
            row["peak_rss_fixed_mmap_bytes"] = fixed["peak_rss_bytes"]
            row["rss_fixed_mmap_threshold"] = fixed["malloc_mmap_threshold"]
    cap = int(cap_gb * 2**30)
    tp_cases = [
        Case(model, length, name, None if name == "full" else budget, 1, 16, 1, threads)
        for model in models for length in throughput_lengths for name in presses
        for budget in ([None] if name == "full" else budgets)
    ]  # fmt: skip
    tp_rows = [isolated(c, cap_bytes=cap) for c in tqdm(tp_cases, desc="throughput", unit="case")]
    report = {"cases": ratio_rows(rows), "throughput": tp_rows, "selection": selection_timing()}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    write_report(report, out, cap_gb)
    return report


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    case = Case(**job["case"])
    print(json.dumps(measure(case) if job["cap_bytes"] is None else throughput(case, job["cap_bytes"])))
