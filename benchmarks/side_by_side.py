"""Decode speed and compression time of this tree against another checkout, side by side in one run.

Each round runs every case once per tree, alternating, each in a fresh process (``python -m
clusterattn.bench``, the measurement of ``clusterattn bench``) with the tree's ``src`` first on
``PYTHONPATH``; ratios are this tree over the baseline, per round, then their median (machines are
shared and noisy: a ratio within a round compares like with like).

    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/side_by_side.py --baseline /tmp/base --length 8192 --budget 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("decode_ms_per_token", "compress_s", "prefill_s")


def run_case(tree: Path, case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    job = json.dumps({"case": case, "cap_bytes": None})
    proc = subprocess.run(
        [sys.executable, "-m", "clusterattn.bench", job], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pick(rows: list[dict], tree: str, round_: int, case: dict, metric: str) -> float:
    return next(
        row[metric]
        for row in rows
        if row["tree"] == tree and row["round"] == round_ and row["press"] == case["press"]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare against (its src/)")
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens (default 8192)")
    parser.add_argument("--budget", type=int, default=512, help="ClusterAttn budget (default 512)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per case (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--model", default="smollm2-135m", help="registry model (default smollm2-135m)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and ratios as JSON here")
    args = parser.parse_args(argv)
    cases = [
        {"model": args.model, "length": args.length, "press": "full", "new_tokens": args.new_tokens,
         "repeats": 1},
        {
            "model": args.model, "length": args.length, "press": "clusterattn", "budget": args.budget,
            "new_tokens": args.new_tokens, "repeats": 1,
        },
    ]  # fmt: skip
    trees = {"this tree": ROOT, "baseline": args.baseline.resolve()}
    rows = []
    jobs = [(r, case, name) for r in range(args.rounds) for case in cases for name in trees]
    for round_, case, name in tqdm(jobs, desc="cases", unit="case"):
        rows.append({"round": round_, "tree": name, **run_case(trees[name], case)})
    print(f"| case | metric | this tree | baseline | ratio (median of {args.rounds} rounds) |")
    print("|---|---|---|---|---|")
    summary = []
    for case in cases:
        label = case["press"] + (f" B={case['budget']}" if "budget" in case else "")
        for metric in METRICS:
            if metric == "compress_s" and case["press"] == "full":
                continue
            ours = [_pick(rows, "this tree", r, case, metric) for r in range(args.rounds)]
            base = [_pick(rows, "baseline", r, case, metric) for r in range(args.rounds)]
            ratio = statistics.median(o / b for o, b in zip(ours, base, strict=True) if b)
            summary.append({"case": label, "metric": metric, "ours": ours, "baseline": base, "ratio": ratio})
            print(
                f"| {label} | {metric} | {statistics.median(ours):.4g} | {statistics.median(base):.4g} "
                f"| {ratio:.3f} |"
            )
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"baseline": str(args.baseline)}, "rows": rows,
                                        "summary": summary}, indent=1, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
