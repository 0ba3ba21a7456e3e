"""Needle-in-a-haystack accuracy of presses at several budgets (the README's table).

One prefill per sample is shared by every press and budget (:func:`clusterattn.generate_many`).
Results are appended to ``results.jsonl`` as they come, so an interrupted run resumes where it
stopped; ``table.md`` and ``accuracy.png`` are rebuilt from that file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from clusterattn.eval.niah import make_needle_samples, score_answer
from clusterattn.generation import generate_many
from clusterattn.presses import PRESSES

DEFAULT_PRESSES = ("clusterattn", "snapkv", "chunkkv", "streamingllm", "h2o", "pyramidkv")


def build_presses(names, budgets) -> dict[str, object]:
    """``{"name@budget": press}`` for every name and budget, plus ``"full"``."""
    presses = {"full": None}
    for name in names:
        if name not in PRESSES or name == "full":
            raise ValueError(f"press {name!r} unknown; choose from {sorted(set(PRESSES) - {'full'})}")
        for budget in budgets:
            presses[f"{name}@{budget}"] = PRESSES[name](budget=budget)
    return presses


def run_needle(
    model,
    tokenizer,
    *,
    lengths,
    samples: int,
    budgets,
    presses=DEFAULT_PRESSES,
    out_dir: str | Path,
    seed: int = 0,
    query_aware: bool = True,
    max_new_tokens: int = 12,
) -> list[dict]:
    """Run (or resume) the grid; returns all result rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    rows = (
        [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    )
    done = {(r["length"], r["sample"]) for r in rows}
    grid = build_presses(presses, budgets)
    todo = []
    for length in lengths:
        for i, sample in enumerate(make_needle_samples(tokenizer, length, samples, seed=seed)):
            if (length, i) not in done:
                todo.append((length, i, sample))
    with results_path.open("a") as sink:
        for length, i, sample in tqdm(todo, desc="needle samples", unit="sample"):
            outputs = generate_many(
                model, tokenizer, sample.context, sample.question, presses=grid,
                max_new_tokens=max_new_tokens, query_aware=query_aware,
                answer_prefix=" " + sample.answer_prefix,
            )  # fmt: skip
            for key, output in outputs.items():
                name, _, budget = key.partition("@")
                row = {
                    "length": length, "sample": i, "depth": sample.depth, "press": name,
                    "budget": int(budget) if budget else None, "answer": sample.answer,
                    "prediction": output.text, "correct": score_answer(output.text, sample.answer),
                    "prompt_tokens": output.stats["prompt_tokens"],
                }  # fmt: skip
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
            sink.flush()
    write_report(rows, out, budgets)
    return rows


def accuracy_table(rows: list[dict], budgets) -> tuple[list[str], list[list[str]]]:
    """Markdown-ready header and rows: one row per press, one column per (length, budget)."""
    lengths = sorted({r["length"] for r in rows})
    hits, totals = defaultdict(int), defaultdict(int)
    for r in rows:
        hits[r["press"], r["length"], r["budget"]] += r["correct"]
        totals[r["press"], r["length"], r["budget"]] += 1
    header = ["press"] + [f"{length // 1024}k B={b}" for length in lengths for b in budgets]
    names = ["full"] + [p for p in dict.fromkeys(r["press"] for r in rows) if p != "full"]
    table = []
    for name in names:
        cells = []
        for length in lengths:
            for b in budgets:
                key = (name, length, None if name == "full" else b)
                cells.append(f"{hits[key]}/{totals[key]}" if totals[key] else "-")
        table.append([name, *cells])
    return header, table


def write_report(rows: list[dict], out: Path, budgets) -> None:
    header, table = accuracy_table(rows, budgets)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "accuracy.png", budgets)


def _plot(rows, path: Path, budgets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        sub = [r for r in rows if r["length"] == length]
        full = [r["correct"] for r in sub if r["press"] == "full"]
        if full:
            ax.axhline(sum(full) / len(full), color="black", ls="--", label="full cache")
        for name in dict.fromkeys(r["press"] for r in sub if r["press"] != "full"):
            acc = []
            for b in budgets:
                cell = [r["correct"] for r in sub if r["press"] == name and r["budget"] == b]
                acc.append(sum(cell) / len(cell) if cell else float("nan"))
            ax.plot(budgets, acc, marker="o", lw=2.5 if name == "clusterattn" else 1.2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(budgets), [str(b) for b in budgets])
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"needle accuracy, {length} tokens")
        ax.set_xlabel("budget (tokens per KV head)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
