"""Results and report of the long-output benches (``long_output_fidelity.py``, ``long_output_recall.py``).

Rows are appended to a JSON-lines file as they are measured (the runs resume from it). The fidelity
report is a Markdown table per prompt kind (``table.md``) and a figure (``fidelity.png``): the
common prefix with the full cache's output and the top-1 agreement after the first eviction,
against the decode budget, one line per press. Draw both again from a results folder with:

    .venv/bin/python benchmarks/long_output_report.py docs/long-output-qwen05b

(the figure needs matplotlib, which is in ``.venv``, not in ``.venv-peers``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _publish(out: Path, summary: str) -> int:
    """Write ``summary`` to ``out/table.md`` and print it; the exit status."""
    (out / "table.md").write_text(summary + "\n")
    print(summary)
    return 0


def _last_of_repeats(rows: list[dict]) -> list[dict]:
    """One row per prompt, press and budget: the last appended (two processes may repeat a row)."""
    return list({(r["prompt"], r["press"], r["budget"]): r for r in rows}.values())


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def table(rows: list[dict], names: list[str], budgets: list[int]) -> str:
    """Markdown: one line per press and budget, means over prompts."""
    lines = [
        "| press | decode budget | prompts | common prefix (mean / median) | top-1 agreement "
        "| top-1 after the first eviction | mean log-prob | tokens held (mean / peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for budget in [0] if name == "full" else budgets:
            group = [r for r in rows if r["press"] == name and r["budget"] == budget]
            if not group:
                continue
            prefix = [r["common_prefix"] for r in group]
            after = _mean(r["top1_after_eviction"] for r in group)
            lines.append(
                f"| {name} | {budget or '-'} | {len(group)} | {statistics.fmean(prefix):.0f} / "
                f"{statistics.median(prefix):.0f} | {100 * _mean(r['top1_agreement'] for r in group):.1f} % "
                f"| {'-' if after != after else f'{100 * after:.1f} %'} "
                f"| {_mean(r['mean_logprob'] for r in group):.3f} "
                f"| {_mean(r['mean_held'] for r in group):.0f} / {max(r['peak_held'] for r in group)} |"
            )
    return "\n".join(lines)


def report(rows: list[dict], names: list[str], budgets: list[int]) -> str:
    """:func:`table` over all prompts, the coding specifications and the essay summaries, and per
    budget ClusterAttn's common prefix against kvpress's SnapKV prompt by prompt."""
    rows = _last_of_repeats(rows)
    parts = []
    kinds = (("All prompts", ""), ("Coding specifications", "spec-"), ("Essay summaries", "essay-"))
    for title, kind in kinds:
        subset = [r for r in rows if r["prompt"].startswith(kind)]
        if subset:
            parts.append(f"**{title}**\n\n{table(subset, names, budgets)}")
    for budget in budgets:
        ours = {r["prompt"]: r for r in rows if r["press"] == "clusterattn" and r["budget"] == budget}
        theirs = {r["prompt"]: r for r in rows if r["press"] == "kvpress-snapkv" and r["budget"] == budget}
        both = sorted(set(ours) & set(theirs))
        if both:
            diff = [ours[p]["common_prefix"] - theirs[p]["common_prefix"] for p in both]
            parts.append(
                f"Budget {budget}, common prefix, clusterattn against kvpress-snapkv, {len(both)} prompts: "
                f"longer on {sum(d > 0 for d in diff)}, equal on {sum(d == 0 for d in diff)}, shorter on "
                f"{sum(d < 0 for d in diff)}; mean difference {statistics.fmean(diff):+.0f} tokens."
            )
    return "\n\n".join(parts)


def _values(rows: list[dict], key: str, press: str, budget: int, prompts: set[str]) -> list:
    return [r[key] for r in rows if r["press"] == press and r["budget"] == budget and r["prompt"] in prompts]


def figure(rows: list[dict], names: list[str], path: Path) -> Path:
    """``path`` (PNG): mean common prefix and mean top-1 agreement after the first eviction against
    the decode budget, one line per press; the full cache's control rows as a dashed line. At each
    budget the means are over the prompts every press has a row for (a run still going is marked
    with its count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _last_of_repeats(rows)
    presses = [n for n in names if n != "full" and any(r["press"] == n for r in rows)]
    prompts = {r["prompt"] for r in rows}
    shared = {}  # budget -> the prompts every press has measured there
    for budget in sorted({r["budget"] for r in rows if r["budget"]}):
        sets = [{r["prompt"] for r in rows if r["press"] == n and r["budget"] == budget} for n in presses]
        shared[budget] = set.intersection(*sets) if sets else set()
    budgets = [b for b, common in shared.items() if common]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("common_prefix", "common prefix with the full cache (tokens, mean)", 1),
              ("top1_after_eviction", "top-1 agreement after the first eviction (%)", 100))  # fmt: skip
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        full = [r[key] for r in rows if r["press"] == "full"]
        if full and key == "common_prefix":
            ax.axhline(_mean(full), color="black", ls="--", lw=1, label="full cache")
        for name in presses:
            means = [scale * _mean(_values(rows, key, name, b, shared[b])) for b in budgets]
            ax.plot(budgets, means, marker="o", label=name)
        ax.set_xscale("log", base=2)
        partial = {
            b: "" if len(shared[b]) == len(prompts) else f"\n({len(shared[b])} prompts)" for b in budgets
        }
        ax.set_xticks(budgets, [f"{b}{partial[b]}" for b in budgets])
        ax.set_xlabel("decode budget (tokens per KV head)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"Long generations under decode-phase eviction ({len(prompts)} prompts)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild table.md and fidelity.png of a fidelity run.")
    parser.add_argument("out", type=Path, help="the run's folder (results.jsonl, run.json)")
    args = parser.parse_args(argv)
    rows = _rows(args.out / "results.jsonl")
    if not rows:
        parser.error(f"{args.out / 'results.jsonl'} has no rows")
    run = json.loads((args.out / "run.json").read_text())["args"] if (args.out / "run.json").is_file() else {}
    names = run.get("presses") or list(dict.fromkeys(r["press"] for r in rows))
    budgets = sorted({r["budget"] for r in rows if r["budget"]}, reverse=True)
    figure(rows, names, args.out / "fidelity.png")
    return _publish(args.out, report(rows, names, budgets))


if __name__ == "__main__":
    raise SystemExit(main())
