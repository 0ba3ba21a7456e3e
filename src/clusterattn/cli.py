"""``clusterattn`` command line: ``demo`` (the README's first run) and ``needle`` (accuracy table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    from clusterattn.analysis.commands import add_commands as add_analysis_commands
    from clusterattn.eval.needle import DEFAULT_PRESSES
except ImportError as err:  # the library installs without the harness's dependencies
    raise SystemExit(
        f"the clusterattn command needs the harness extras: pip install 'clusterattn[eval]' ({err})"
    ) from err


def _demo(args) -> int:
    import clusterattn as ca
    from clusterattn.eval.niah import make_needle_sample, score_answer

    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = ca.load_model(args.model)
    sample = make_needle_sample(tokenizer, args.length, depth=0.4, seed=args.seed)
    print(f"needle: {sample.answer!r} at depth {sample.depth:.0%} of a {sample.n_tokens}-token essay prompt")
    print(f"question: {sample.question}\n", flush=True)
    runs = [("full cache", None)]
    for budget in args.budgets:
        runs += [
            (f"ClusterAttn B={budget}", ca.ClusterAttnPress(budget=budget)),
            (f"SnapKV B={budget}", ca.SnapKVPress(budget=budget)),
            (f"StreamingLLM B={budget}", ca.StreamingLLMPress(budget=budget)),
        ]
    header = (
        f"{'press':<20} {'answer':<14} {'ok':<3} {'kept':>6} {'KV MB':>7} "
        f"{'prefill s':>9} {'compress s':>10} {'decode s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, press in runs:
        out = ca.generate(
            model, tokenizer, sample.context, sample.question, press=press,
            max_new_tokens=12, answer_prefix=" " + sample.answer_prefix,
        )  # fmt: skip
        s = out.stats
        kept = max(s["kept_tokens"].values()) if s["kept_tokens"] else s["prompt_tokens"]
        ok = "yes" if score_answer(out.text, sample.answer) else "no"
        answer = out.text.strip().replace("\n", " ")[:14]
        print(
            f"{name:<20} {answer:<14} {ok:<3} {kept:>6} {s['kv_bytes'] / 2**20:>7.1f} "
            f"{s['prefill_s']:>9.2f} {s['compress_s']:>10.3f} {s['decode_s']:>8.2f}",
            flush=True,
        )
    return 0


def _needle(args) -> int:
    import clusterattn as ca
    from clusterattn.eval.needle import build_presses, run_needle

    build_presses(args.presses, args.budgets)  # bad names fail before the model loads
    model, tokenizer = ca.load_model(args.model)
    run_needle(
        model, tokenizer, lengths=args.lengths, samples=args.samples, budgets=args.budgets,
        presses=args.presses, out_dir=args.out, seed=args.seed, query_aware=not args.query_agnostic,
    )  # fmt: skip
    print((Path(args.out) / "table.md").read_text())
    return 0


def _figure(args) -> int:
    import clusterattn as ca
    from clusterattn.eval.figures import kept_clusters_figure

    model, tokenizer = ca.load_model(args.model)
    print(kept_clusters_figure(model, tokenizer, args.out, n_tokens=args.length, budget=args.budget))
    return 0


def _bench(args) -> int:
    from clusterattn.bench import run_bench

    run_bench(
        models=args.models, lengths=args.lengths, presses=args.presses, budgets=args.budgets,
        batches=args.batches, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.bench_threads,
        throughput_lengths=args.throughput_lengths, cap_gb=args.cap_gb, out_dir=args.out,
        mmap_threshold=args.mmap_threshold, rss_mmap_threshold=args.rss_mmap_threshold,
        decodes=[None if d == "eager" else args.compile_backend for d in args.decode],
        prefill_chunks=[chunk or None for chunk in args.prefill_chunk],
        decode_budgets=[kept or None for kept in args.decode_budget], interval=args.interval,
    )  # fmt: skip
    print((Path(args.out) / "bench.md").read_text())
    return 0


def _eval(args) -> int:
    from clusterattn.eval.report import write_report
    from clusterattn.eval.runner import EvalConfig, run_eval

    config = EvalConfig(
        models=args.models,
        tasks=args.tasks,
        lengths=args.lengths,
        presses=args.presses,
        peers=args.peer,
        budgets=args.budgets,
        settings=args.settings,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        longbench=args.longbench,
        profile=args.profile,
        retry_failed=args.retry_failed,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
    )  # fmt: skip  (validated here, before any model loads)
    run_eval(config)
    write_report(args.out, doc=args.doc)
    print((Path(args.out) / "tables.md").read_text())
    return 0


def _eval_report(args) -> int:
    from clusterattn.eval.report import write_report

    for path in write_report(args.out, doc=args.doc):
        print(path)
    return 0


def _eval_compare(args) -> int:
    from clusterattn.eval.agreement import compare_folders

    print(compare_folders(args.a, args.b, labels=tuple(args.labels)), end="")
    return 0


def _add_eval(sub) -> None:
    from clusterattn.eval.grid import SETTINGS
    from clusterattn.eval.runner import DEFAULT_PRESSES

    ev = sub.add_parser(
        "eval",
        formatter_class=DEFAULTS,
        help="RULER / LongBench accuracy over models x presses x budgets x tasks x lengths (resumable)",
    )
    ev.add_argument("--models", nargs="+", default=["smollm2-135m"], help="registry names or paths")
    ev.add_argument(
        "--tasks", nargs="+", default=["niah_single_2"], help="RULER tasks, all, niah, or LongBench datasets"
    )
    ev.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt tokens")
    ev.add_argument(
        "--presses",
        nargs="+",
        default=list(DEFAULT_PRESSES),
        help="name[:key=value,...], e.g. clusterattn:num_block=16",
    )
    ev.add_argument(
        "--peer",
        nargs="*",
        default=[],
        help="kvpress presses run in .venv-peers, e.g. snapkv chunkkv:chunk_length=32",
    )
    ev.add_argument(
        "--budgets", nargs="+", default=["128", "256"], help="token budgets (ints) or ratios (0.5)"
    )
    ev.add_argument(
        "--settings",
        nargs="+",
        default=["query_aware"],
        choices=SETTINGS,
        help="question inside the compressed prompt or after it",
    )
    ev.add_argument("--samples", type=int, default=10, help="samples per task and length")
    ev.add_argument("--seed", type=int, default=0, help="sample seed (one per output folder)")
    ev.add_argument("--longbench", default=None, help="a LongBench-format JSONL file instead of RULER")
    ev.add_argument("--profile", default=None, help="ClusterAttn profile JSON from `clusterattn profile`")
    ev.add_argument(
        "--max-new-tokens", type=int, default=None, help="cap on each task's own generation length"
    )
    ev.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="model dtype, ours and the kvpress worker's (one per output folder)",
    )  # fmt: skip
    ev.add_argument("--retry-failed", action="store_true", help="rerun samples recorded as failed")
    ev.add_argument("--out", default="runs/eval", help="output folder (resumed when it exists)")
    ev.add_argument("--doc", default=None, help="Markdown file whose eval section is rewritten")
    ev.set_defaults(func=_eval)
    report = sub.add_parser(
        "eval-report", formatter_class=DEFAULTS, help="rebuild metrics.csv, tables and figures of an eval run"
    )
    report.add_argument("--out", default="runs/eval", help="the eval run's folder")
    report.add_argument("--doc", default=None, help="Markdown file whose eval section is rewritten")
    report.set_defaults(func=_eval_report)
    compare = sub.add_parser(
        "eval-compare",
        formatter_class=DEFAULTS,
        help="two runs of the same grid side by side: identical answers, scores and prefill times",
    )
    compare.add_argument("a", help="the first eval run's folder")
    compare.add_argument("b", help="the second eval run's folder")
    compare.add_argument("--labels", nargs=2, default=["A", "B"], help="the two runs' names in the table")
    compare.set_defaults(func=_eval_compare)


DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clusterattn", description=__doc__, formatter_class=DEFAULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        formatter_class=DEFAULTS,
        help="needle prompt answered with full, ClusterAttn, SnapKV, StreamingLLM",
    )
    demo.add_argument("--model", default="smollm2-135m", help="registry name, HF folder or .gguf file")
    demo.add_argument("--length", type=int, default=2048, help="prompt tokens")
    demo.add_argument("--budgets", type=int, nargs="+", default=[128, 256], help="tokens kept per KV head")
    demo.add_argument("--seed", type=int, default=3, help="needle sample seed")
    demo.set_defaults(func=_demo)
    needle = sub.add_parser(
        "needle", formatter_class=DEFAULTS, help="needle accuracy table over presses, budgets and lengths"
    )
    needle.add_argument("--model", default="smollm2-135m", help="registry name, HF folder or .gguf file")
    needle.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096], help="prompt tokens")
    needle.add_argument("--samples", type=int, default=10, help="needle prompts per length")
    needle.add_argument(
        "--budgets", type=int, nargs="+", default=[64, 128, 256, 512], help="tokens kept per KV head"
    )
    needle.add_argument("--presses", nargs="+", default=list(DEFAULT_PRESSES), help="press names (PRESSES)")
    needle.add_argument("--seed", type=int, default=0, help="sample seed")
    needle.add_argument(
        "--query-agnostic", action="store_true", help="compress the context before the question"
    )
    needle.add_argument("--out", default="runs/needle", help="output folder")
    needle.set_defaults(func=_needle)
    figure = sub.add_parser(
        "figure", formatter_class=DEFAULTS, help="picture of kept clusters vs top-k on a real prompt"
    )
    figure.add_argument("--model", default="smollm2-135m", help="registry name, HF folder or .gguf file")
    figure.add_argument("--length", type=int, default=2048, help="prompt tokens")
    figure.add_argument("--budget", type=int, default=128, help="tokens kept per KV head")
    figure.add_argument("--out", default="docs/clusters.png", help="PNG file written")
    figure.set_defaults(func=_figure)
    bench = sub.add_parser(
        "bench",
        formatter_class=DEFAULTS,
        help="latency, memory and throughput, full cache and presses side by side",
    )
    bench.add_argument("--models", nargs="+", default=["smollm2-135m"], help="registry names or paths")
    bench.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="prompt tokens"
    )
    bench.add_argument(
        "--presses",
        nargs="+",
        default=["full", "clusterattn", "snapkv"],
        help="press names; ratios need full among them",
    )
    bench.add_argument("--budgets", type=int, nargs="+", default=[512], help="tokens kept per KV head")
    bench.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes of the latency cases")
    bench.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per case")
    bench.add_argument("--repeats", type=int, default=3, help="runs per case (medians reported)")
    bench.add_argument(
        "--bench-threads", type=int, default=2, help="torch CPU threads of each case's process"
    )
    bench.add_argument(
        "--throughput-lengths",
        type=int,
        nargs="*",
        default=[4096],
        help="prompt lengths of the memory-capped throughput cases (none: skip)",
    )
    bench.add_argument("--cap-gb", type=float, default=8.0, help="memory cap of the throughput cases, GB")
    bench.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, bench.png")
    bench.add_argument(
        "--mmap-threshold", type=int, default=0,
        help="fix glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in every timed case's process; 0: the "
        "environment's setting",
    )  # fmt: skip
    bench.add_argument(
        "--rss-mmap-threshold", type=int, default=131072,
        help="run each case once more with MALLOC_MMAP_THRESHOLD_ fixed at this many bytes and report "
        "that process's peak RSS too: freed memory goes back to the system, so the peak is "
        "reproducible (131072 is glibc's starting value; 0: skip this second process)",
    )  # fmt: skip
    bench.add_argument(
        "--decode", nargs="+", default=["eager"], choices=["eager", "compiled"],
        help="decode paths, each a set of cases: eager (the dynamic cache, step by step from Python), "
        "compiled (a static cache and the step compiled by --compile-backend; one untimed run compiles)",
    )  # fmt: skip
    bench.add_argument(
        "--compile-backend", default="inductor", choices=["inductor", "eager", "aot_eager"],
        help="torch.compile backend of the compiled decode path",
    )  # fmt: skip
    bench.add_argument(
        "--prefill-chunk", type=int, nargs="+", default=[0],
        help="prefill variants, each a set of cases: run each decoder layer over at most this many prompt "
        "tokens at a time (same outputs; lower peak memory at long prompts; multiples of 512 are "
        "bit-identical with sdpa on CPU); 0: one pass (default)",
    )  # fmt: skip
    bench.add_argument(
        "--decode-budget", type=int, nargs="+", default=[0],
        help="long-output variants, each a set of cases: the presses also compress while decoding "
        "(DecodingPress), keeping this many tokens per KV head; 0: the prompt only",
    )  # fmt: skip
    bench.add_argument(
        "--interval", type=int, default=128,
        help="tokens appended between two re-selections of a decode budget",
    )  # fmt: skip
    bench.set_defaults(func=_bench)
    _add_eval(sub)
    add_analysis_commands(sub)  # profile, analyze
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
