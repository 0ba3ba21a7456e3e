"""The ``clusterattn profile`` and ``clusterattn analyze`` subcommands (registered by ``cli.main``).

Arguments are validated (dataclasses, task names, files) before any model loads.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

DEFAULT_TASKS = ("niah_single_2", "niah_multikey_1", "vt", "qa_1")


def _profile(args) -> int:
    from clusterattn.analysis.profile import ProfileGrid, ProfileSpec, evaluate_heldout, profile_task

    spec = ProfileSpec(
        task=args.task,
        length=args.length,
        n_samples=args.samples,
        fraction=args.fraction,
        seed=args.seed,
        steps=args.steps,
        stop_at_eos=not args.ignore_eos,
        model=args.model,
    )
    grid = ProfileGrid(
        budgets=args.budgets,
        num_blocks=args.num_blocks,
        alphas=args.alphas,
        window_sizes=args.window_sizes,
        objective=args.objective,
        rule=args.rule,
    )
    if args.evaluate_only and not Path(args.out).is_file():
        raise ValueError(f"--evaluate-only needs an existing profile at {args.out}")
    import clusterattn as ca

    model, tokenizer = ca.load_model(args.model)
    if not args.evaluate_only:
        result = profile_task(model, tokenizer, spec, grid, out=args.out)
        for budget, entry in result["budgets"].items():
            print(
                f"B={budget}: default num_block {entry['default_config']['num_block']} (cosine "
                f"{entry['default_cosine']:.4f}) -> profiled {entry['config']} (cosine {entry['cosine']:.4f})"
            )
    if args.evaluate or args.evaluate_only:
        held = evaluate_heldout(
            model,
            tokenizer,
            args.out,
            max_samples=args.max_eval,
            max_new_tokens=args.max_new_tokens,
            budgets=args.eval_budgets,
        )
        print(f"held-out accuracy over {held['n']} samples: " + json.dumps(held["accuracy"]))
    print(f"profile written to {args.out}")
    return 0


def _profile_paths(items) -> list[Path]:
    paths = []
    for item in items or []:
        path = Path(item)
        paths += sorted(path.glob("*.json")) if path.is_dir() else [path]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"profile {path} does not exist")
    return paths


def profiles_for_length(profiles: list[dict], length: int, objective: str = "cosine") -> dict[str, dict]:
    """``{task: profile}`` of the profiles made at ``length`` with ``objective`` and the plain rule
    (the best mean; a ``dominant`` profile answers another question): the analysis traces a task's
    held-out samples, drawn with the profile's own seed, and compares its tuned num_block at that
    length only (a profile directory may hold the same task at several lengths and objectives).
    Two profiles of one task at one length and objective are an error."""
    from clusterattn.analysis.report import objective_of

    chosen: dict[str, dict] = {}
    for profile in profiles:
        plain = profile.get("rule", "mean") == "mean"
        if profile["length"] != length or objective_of(profile) != objective or not plain:
            continue
        if profile["task"] in chosen:
            raise ValueError(f"two profiles of task {profile['task']!r} at length {length}")
        chosen[profile["task"]] = profile
    return chosen


def _analyze(args) -> int:
    from clusterattn.analysis.analyze import ALL_METHODS, AnalysisSpec
    from clusterattn.analysis.data import check_task
    from clusterattn.analysis.report import analysis_json, write_report

    profiles = _profile_paths(args.profiles)
    out = Path(args.out)
    command = "`clusterattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`"
    if args.report_only:
        path = write_report(args.doc, out, profiles, command, args.also)
        print(path)
        return 0
    for task in args.tasks:
        check_task(task)
    for other in args.also:  # before any model loads
        analysis_json(other)
    loaded = profiles_for_length([json.loads(p.read_text()) for p in profiles], args.length)
    if profiles and not loaded:  # going on would ignore the profiles given without a word
        raise ValueError(
            f"none of the {len(profiles)} profiles given was made at --length {args.length} with the "
            "cosine objective and the mean rule: profile at this length first"
        )
    tuned = {
        Path(t).stem: {b: e["config"]["num_block"] for b, e in p["budgets"].items()}
        for t, p in loaded.items()
    }
    # without a profile the "profiled" DBAC would be the default one again: leave it out
    methods = [m for m in ALL_METHODS if tuned or m != "dbac_tuned"]
    spec = AnalysisSpec(budgets=args.budgets, methods=methods, top=args.top, tuned=tuned)
    import clusterattn as ca

    model, tokenizer = ca.load_model(args.model)
    summary = run_analysis(model, tokenizer, args, spec, loaded, command)
    print(
        json.dumps(
            {
                b: {m: round(c["fit_prefix"], 4) for m, c in cells.items()}
                for b, cells in summary["methods"].items()
            },
            indent=1,
        )
    )
    print(write_report(args.doc, out, profiles, command, args.also))
    return 0


def run_analysis(model, tokenizer, args, spec, profiles: dict, command: str = "") -> dict:
    """Trace ``args.samples`` samples per task (the profile's held-out ones when a profile of the
    task is given), analyse each trace as it comes, draw the figures, write ``analysis.json``."""
    from tqdm import tqdm

    from clusterattn.analysis import figures
    from clusterattn.analysis.analyze import analyze_trace, summarise
    from clusterattn.analysis.data import load_samples
    from clusterattn.analysis.trace import EmptyAnswer, trace_decode

    out = Path(args.out)
    rows = []
    for task in args.tasks:
        profile = profiles.get(task)
        if profile is not None:
            samples = load_samples(
                task, args.length, profile["split"]["n_samples"], tokenizer, seed=profile["seed"]
            )
            samples = [samples[i] for i in profile["split"]["heldout_indices"]]
        else:
            samples = load_samples(task, args.length, 2 * args.samples, tokenizer, seed=args.seed)
        done = 0
        for s in tqdm(samples, desc=f"analyze {Path(task).stem}", unit="sample"):
            try:  # a sample whose answer ends at once has no decode step: take the next one
                trace = trace_decode(
                    model, tokenizer, s.context, s.question, answer_prefix=s.answer_prefix, steps=args.steps
                )
            except EmptyAnswer:
                continue
            rows.append({"index": s.index, **analyze_trace(Path(task).stem, trace, spec)})
            if done == 0:
                figures.heads_heatmap(
                    trace,
                    out / f"heads_{Path(task).stem}.png",
                    budget=spec.budgets[0],
                    title=f"{Path(task).stem}, {trace.seq} tokens, answer {trace.text.strip()[:40]!r}",
                )
            del trace
            done += 1
            if done == args.samples:
                break
    summary = {
        "command": command,
        "model": args.model,
        "length": args.length,
        "per_trace": rows,
        **summarise(rows),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(summary, indent=1) + "\n")
    figures.stability_figure(summary, out / "stability.png", str(spec.budgets[0]))
    figures.share_curve(summary, out / "share_curve.png")
    figures.fitting_bars(summary, out / "fitting_rate.png")
    return summary


def add_commands(sub) -> None:
    """Add ``profile`` and ``analyze`` to the ``clusterattn`` subparsers ``sub``."""
    prof = sub.add_parser(
        "profile",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="tune ClusterAttn's num_block per task on a seeded 20 % split",
    )
    prof.add_argument("--task", required=True, help="niah, a RULER task name, or a .jsonl file")
    prof.add_argument("--model", default="smollm2-135m", help="registry name, HF folder or .gguf file")
    prof.add_argument("--length", type=int, default=2048, help="prompt tokens")
    prof.add_argument("--samples", type=int, default=15, help="samples in all (profile + held-out)")
    prof.add_argument("--fraction", type=float, default=0.2, help="share of the samples profiled")
    prof.add_argument("--seed", type=int, default=0, help="sample and split seed")
    prof.add_argument("--budgets", type=int, nargs="+", default=[128, 256], help="budgets profiled")
    prof.add_argument("--num-blocks", type=int, nargs="+", default=None, help="default: a ladder per budget")
    prof.add_argument("--alphas", type=float, nargs="+", default=[1.0], help="theta scales tried")
    prof.add_argument("--window-sizes", type=int, nargs="+", default=[32], help="observation windows tried")
    prof.add_argument(
        "--objective",
        choices=["cosine", "answer"],
        default="cosine",
        help="rank candidates by the decode queries' restricted-attention cosine (the paper's "
        "procedure) or by the log-probability their cache gives to the full cache's answer",
    )
    prof.add_argument(
        "--rule",
        choices=["mean", "dominant"],
        default="mean",
        help="take the best mean over the profile samples, or leave the default only for a candidate "
        "that beats it on every profile sample",
    )
    prof.add_argument("--steps", type=int, default=32, help="decode queries recorded per sample")
    prof.add_argument("--ignore-eos", action="store_true", help="decode all steps even past the answer")
    prof.add_argument(
        "--evaluate", action="store_true", help="then score default vs tuned on the held-out part"
    )
    prof.add_argument("--evaluate-only", action="store_true", help="only score an existing profile (--out)")
    prof.add_argument("--max-eval", type=int, default=None, help="at most this many held-out samples")
    prof.add_argument("--eval-budgets", type=int, nargs="+", default=None, help="default: every budget")
    prof.add_argument("--max-new-tokens", type=int, default=None, help="cap the task's generation length")
    prof.add_argument("--out", required=True, help="profile JSON to write")
    prof.set_defaults(func=_profile)
    ana = sub.add_parser(
        "analyze",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="attention clusters, hit rate, fitting rate per clustering method",
    )
    ana.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="RULER tasks traced")
    ana.add_argument("--model", default="smollm2-135m", help="registry name, HF folder or .gguf file")
    ana.add_argument("--length", type=int, default=2048, help="prompt tokens")
    ana.add_argument("--samples", type=int, default=3, help="traced samples per task")
    ana.add_argument("--seed", type=int, default=1, help="sample seed for tasks without a profile")
    ana.add_argument("--budgets", type=int, nargs="+", default=[128, 256], help="budgets analysed")
    ana.add_argument("--steps", type=int, default=32, help="decode steps traced per sample")
    ana.add_argument("--top", type=int, default=16, help="top tokens per decode step for the hit rate")
    ana.add_argument(
        "--profiles",
        nargs="*",
        default=[],
        help="profile JSONs (or folders): tuned num_block, held-out samples",
    )
    ana.add_argument("--out", default="docs/analysis", help="folder for the figures and JSON")
    ana.add_argument("--doc", default="docs/analysis.md", help="Markdown report written")
    ana.add_argument(
        "--also",
        nargs="*",
        default=[],
        help="other analyze --out folders (other lengths or models) summarised in the doc",
    )
    ana.add_argument("--report-only", action="store_true", help="rebuild the doc from --out and --profiles")
    ana.set_defaults(func=_analyze)
