"""Configurations and report of ``benchmarks/serving_long_output.py`` (the runner imports them).

A configuration is a press spec for ``CLUSTERATTN_VLLM_PRESS``; the report turns each one's measured
scheduler figures (a dict per configuration, see ``run_child``) into the table, the ratios against
the configurations without decode eviction and the README.
"""

from __future__ import annotations

import math

CONFIGS = {  # name: (label, CLUSTERATTN_VLLM_PRESS or None)
    "full": ("full cache (no press)", None),
    "prompt": ("prompt-only B=256", "clusterattn:budget=256"),
    "d1024": ("B=256, decode D=1024, I=128", "clusterattn:budget=256,decode_budget=1024,interval=128"),
    "d512": ("B=256, decode D=512, I=128", "clusterattn:budget=256,decode_budget=512,interval=128"),
}
EVICTING = ("d1024", "d512")
BASELINES = ("prompt", "full")


def peak_blocks(name: str, meta: dict, block_size: int) -> int:
    """The most blocks one decoding request of configuration ``name`` may hold: the prompt and the
    whole output (no press), the prompt's budget and the output (prompt-only), or the decode budget
    and the interval (decode eviction), by the rule the plugin's scheduler frees blocks by
    (:func:`clusterattn.vllm.spec.physical_tokens`; the last sampled token is never in the cache)."""
    from clusterattn.vllm.spec import parse_press, physical_tokens

    press, prompt = parse_press(CONFIGS[name][1]), meta["prompt_len"]
    slots = (physical_tokens(press, prompt, prompt + g) or prompt + g for g in range(meta["new_tokens"]))
    return math.ceil(max(slots) / block_size)


def fit(name: str, r: dict, meta: dict) -> int:
    """Requests that fit in the KV space for a whole answer: its blocks over the most one request
    holds (measured, or the bound where the run stopped before a request reached it)."""
    return r["num_blocks"] // max(r["max_decode_blocks"], peak_blocks(name, meta, r["block_size"]))


def _count(r: dict, key: str) -> str:
    """A concurrency figure, ``>= n`` when every submitted request was counted (a lower bound)."""
    if key not in r:
        return "-"
    return f"{'>= ' if r[key] == r['requests'] else ''}{r[key]}"


def table(results: dict, meta: dict) -> str:
    """Markdown: one line per configuration, in ``CONFIGS`` order."""
    n = meta["new_tokens"]
    lines = [
        "| configuration | press (`CLUSTERATTN_VLLM_PRESS`) | requests (finished) | "
        f"max running (decode steps) | max running past {n // 2} tokens | max running past {3 * n // 4} "
        "tokens | mean running (decode steps) | preemptions | most blocks a request held (bound) | "
        "requests that fit for a whole answer | wall s | output tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        label, spec = CONFIGS[name]
        lines.append(
            f"| {label} | {f'`{spec}`' if spec else '-'} | {r['requests']} ({r.get('finished', '-')}) | "
            f"{_count(r, 'max_running_decode')} | {_count(r, 'max_running_past_half')} | "
            f"{_count(r, 'max_running_past_three_quarters')} | {r['mean_running_decode']:.1f} | "
            f"{r['preemptions']} | {r['max_decode_blocks']} ({peak_blocks(name, meta, r['block_size'])}) | "
            f"{fit(name, r, meta)} | {r['wall_s']:.0f}{' (stopped)' if r.get('stopped_early') else ''} | "
            f"{r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def ratios(results: dict, meta: dict) -> list[str]:
    """ "concurrent long-output requests with decode eviction / without", per metric and baseline."""
    n = meta["new_tokens"]
    metrics = {
        "fit": "requests that fit for a whole answer",
        "max_running_past_three_quarters": f"max running past {3 * n // 4} tokens",
        "max_running_past_half": f"max running past {n // 2} tokens",
    }
    out = []
    for name in EVICTING:
        for base in BASELINES:
            if name not in results or base not in results:
                continue
            parts, a_r, b_r = [], results[name], results[base]
            for key, what in metrics.items():
                if key == "fit":
                    a, b, bound, flag = fit(name, a_r, meta), fit(base, b_r, meta), "", ""
                elif key in a_r and key in b_r:
                    a, b = a_r[key], b_r[key]
                    bound = " (lower bound: all submitted ran)" if a == a_r["requests"] else ""
                    full = b == b_r["requests"]
                    flag = " (baseline counted every request: not a real limit)" if full else ""
                else:
                    continue
                value = a / b if b else float("nan")
                parts.append(f"{what} {a}/{b} = {value:.2f}x{bound}{flag} ({'>=' if value >= 4 else '<'} 4x)")
            out.append(
                f"- concurrent long-output requests with decode eviction / without, "
                f"{CONFIGS[name][0]} vs {CONFIGS[base][0]}: " + "; ".join(parts)
            )
    return out


def document(results: dict, meta: dict) -> str:
    """The folder's README: settings, each run's command, the columns, the table and the ratios."""
    any_r = next(iter(results.values()))
    n = meta["new_tokens"]
    runs: dict[str, dict] = {}  # command -> its stamp and the configurations it ran
    for name, r in results.items():
        runs.setdefault(r["command"], {**r, "names": []})["names"].append(name)
    return "\n".join(
        [
            "# Long-output serving: concurrent 4k-token answers in 1 GiB of KV space",
            "",
            "Generated by `benchmarks/serving_long_output.py`; raw figures in `results.json`. Only measured "
            "figures; do not edit by hand.",
            "",
            f"- machine: {meta['machine']}; {meta['vllm']}, SmolLM2-135M, `--dtype {meta['dtype']}`, eager "
            "mode, prefix caching and chunked prefill off;",
            f"- `VLLM_CPU_KVCACHE_SPACE={meta['kv_gib']}`: {any_r['num_blocks']} blocks of "
            f"{any_r['block_size']} tokens ({any_r['num_blocks'] * any_r['block_size']} token slots per "
            "KV head and layer);",
            f"- random-token prompts of {meta['prompt_len']} tokens, `max_tokens = min_tokens = {n}` (EOS "
            f"suppressed: every request writes all {n} tokens), greedy, all requests submitted at once, each "
            "configuration in its own engine process, one after another;",
            *(
                f"- {', '.join(run['names'])}: {run['date']}, commit `{run['commit']}`: `{command}`"
                for command, run in runs.items()
            ),
            "",
            "Columns: *max running (decode steps)*: the most requests in `scheduler.running` after a step in "
            f"which every scheduled request decoded one token (no prefill); *max running past {n // 2} / "
            f"{3 * n // 4} tokens*: the most running requests at once that had already written half / three "
            "quarters of their output (what stays in the KV space deep into a long answer; `-`: not "
            "recorded by that run); *mean running*: over the decode-only steps; *preemptions*: calls of "
            "`scheduler._preempt_request`; *most blocks a request held*: after any of its decoding steps, "
            "with the most it may hold in brackets (the prompt and the whole output; the prompt's budget "
            "and the output; decode budget + interval); *requests that fit for a whole answer*: the KV "
            "space's blocks over the larger of the two; `>= n`: every submitted request was counted (a "
            "lower bound); *wall s (stopped)*: the configuration reached `--max-minutes` and its requests "
            "were abandoned there "
            "(output tok/s: the tokens written until then over that time).",
            "",
            table(results, meta),
            "",
            *ratios(results, meta),
            "",
        ]
    )
