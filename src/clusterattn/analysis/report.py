"""``docs/analysis.md``: tables and figures from profile JSONs and the analysis results, rebuilt by
``make analysis`` (or ``clusterattn analyze --report-only``)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from clusterattn.analysis import figures

METHOD_NAMES = {
    "dbac": "DBAC (default num_block)",
    "dbac_tuned": "DBAC (profiled num_block)",
    "kmeans": "K-means (scikit-learn)",
    "dbscan": "DBSCAN (scikit-learn)",
    "topk": "top-k",
    "snapkv": "SnapKV pooling + top-k",
    "oracle": "oracle (top decode-attention tokens)",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def topk_note(config: dict) -> str:
    """' = top-k' when the spans are one token wide (DBAC reduces to top-k)."""
    return " = top-k" if (config["budget"] - config["window_size"]) // config["num_block"] <= 1 else ""


def objective_of(profile: dict) -> str:
    """The objective a profile maximised (profiles written before there was a choice used the cosine)."""
    return profile.get("objective", "cosine")


def profile_objective(profile: dict) -> str:
    """The profile's label: its :func:`objective_of`, with ``", dominant"`` when the candidates had
    to beat the default on every profile sample and ``", seed N"`` when its samples are not the
    default seed 0's."""
    label = [objective_of(profile)]
    if profile.get("rule") == "dominant":
        label.append("dominant")
    if profile.get("seed", 0):
        label.append(f"seed {profile['seed']}")
    return ", ".join(label)


def _objective_values(entry: dict, prefix: str, objective: str) -> str:
    """A profile entry's cosine, with the answer log-probability first when that was the objective."""
    cosine = f"{entry[prefix + 'cosine']:.4f}"
    if not objective.startswith("answer"):
        return cosine
    return f"log p {entry[prefix + 'answer_logprob']:.3f}, cosine {cosine}"


def profile_section(profiles: list[dict]) -> str:
    """The profiling tables: chosen configurations, then held-out accuracy, one row per task,
    length and objective (in that order)."""
    profiles = sorted(profiles, key=lambda p: (Path(p["task"]).stem, p["length"], profile_objective(p)))
    rows, acc_rows = [], []
    budgets = sorted({b for p in profiles for b in p["budgets"]}, key=int)
    for p in profiles:
        name, objective = Path(p["task"]).stem, profile_objective(p)
        n_prof, n_held = (
            len(p.get("traces", p["split"]["profile_indices"])),
            len(p["split"]["heldout_indices"]),
        )
        for b in budgets:
            e = p["budgets"].get(b)
            if e is None:
                continue
            c = e["config"]
            extra = "".join(
                f", {k} {c[k]}" for k in ("alpha", "window_size") if c[k] != e["default_config"][k]
            )
            rows.append(
                [
                    name,
                    str(p["length"]),
                    b,
                    objective,
                    f"{n_prof} / {n_held}",
                    f"{e['default_config']['num_block']} ({_objective_values(e, 'default_', objective)})",
                    f"**{c['num_block']}**{topk_note(c)}{extra} ({_objective_values(e, '', objective)})",
                ]
            )
    evaluated = [
        b
        for b in budgets
        if any(f"default@{b}" in p.get("heldout", {}).get("accuracy", {}) for p in profiles)
    ]
    for p in profiles:
        held = p.get("heldout")
        if held:
            acc = held["accuracy"]
            cells = [
                Path(p["task"]).stem,
                str(p["length"]),
                profile_objective(p),
                str(held["n"]),
                _pct(acc["full"]),
            ]
            for b in evaluated:
                cells += [
                    _pct(acc.get(f"default@{b}", float("nan"))),
                    _pct(acc.get(f"tuned@{b}", float("nan"))),
                ]
            acc_rows.append(cells)
    out = [
        _table(
            [
                "task",
                "length",
                "budget",
                "objective",
                "traced profile / held-out samples",
                "default num_block (objective values)",
                "profiled num_block (objective values)",
            ],
            rows,
        )
    ]
    if acc_rows:
        header = ["task", "length", "objective", "held-out n", "full"]
        for b in evaluated:
            header += [f"default B={b}", f"tuned B={b}"]
        out += [
            "",
            "Accuracy (%) on the held-out samples (the task's RULER metric, greedy, query-aware):",
            "",
            _table(header, acc_rows),
        ]
        verdicts = []
        for row in acc_rows:
            for i, b in enumerate(evaluated):
                d, t = float(row[5 + 2 * i]), float(row[6 + 2 * i])
                if d != d or t != t:  # not evaluated at this budget
                    continue
                verdicts.append(
                    f"{row[0]} {row[1]} ({row[2]}) B={b}: tuned {'>=' if t >= d else '<'} default "
                    f"({t:.1f} vs {d:.1f})"
                )
        out += ["", "Tuned against default: " + "; ".join(verdicts) + "."]
    return "\n".join(out)


def method_cells(summary: dict, method: str, budgets: list[str], quantities: list[str]) -> list[str]:
    """``quantities`` (%) of ``method`` at each of ``budgets``; "-" where the run lacks a budget."""
    cells = []
    for b in budgets:
        cell = summary["methods"].get(b, {}).get(method)
        cells += [_pct(cell[q]) for q in quantities] if cell else ["-"] * len(quantities)
    return cells


def methods_table(summary: dict, quantities: list[tuple[str, str]]) -> str:
    budgets = sorted(summary["methods"], key=int)
    header = ["method"] + [f"{label} B={b}" for b in budgets for _, label in quantities]
    names = [q for q, _ in quantities]
    rows = [
        [METHOD_NAMES.get(method, method), *method_cells(summary, method, budgets, names)]
        for method in summary["methods"][budgets[0]]
    ]
    return _table(header, rows)


def by_task_table(summary: dict, quantity: str, methods: list[str]) -> str:
    budgets = sorted(summary["methods"], key=int)
    header = ["task", "traces"] + [f"{m} B={b}" for b in budgets for m in methods]
    rows = []
    for task, per in sorted(summary["by_task"].items()):
        n = sum(1 for r in summary["per_trace"] if r["task"] == task)
        rows.append(
            [task, str(n)] + [_pct(per[b][m][quantity]) for b in budgets for m in methods if m in per[b]]
        )
    return _table(header, rows)


def comparison_lines(summary: dict) -> list[str]:
    """Plain statements of who wins the fitting-rate comparison, budget by budget."""
    out = []
    for b in sorted(summary["methods"], key=int):
        cells = summary["methods"][b]
        for dbac in [m for m in ("dbac", "dbac_tuned") if m in cells]:
            mine = cells[dbac]["fit_prefix"]
            for other in [m for m in ("kmeans", "dbscan", "topk", "snapkv") if m in cells]:
                theirs = cells[other]["fit_prefix"]
                verb = "level with" if abs(mine - theirs) < 5e-4 else "above" if mine > theirs else "below"
                out.append(f"B={b}: {dbac} {_pct(mine)} % is {verb} {other} {_pct(theirs)} %")
    return out


def comparisons(summary: dict) -> str:
    """:func:`comparison_lines` as a markdown list."""
    return "\n".join(f"- {line}" for line in comparison_lines(summary))


def analysis_json(folder: str | Path) -> Path:
    """``folder/analysis.json``; ValueError naming ``folder`` when there is none."""
    path = Path(folder) / "analysis.json"
    if not path.is_file():
        raise ValueError(f"{folder} holds no analysis.json (run clusterattn analyze --out {folder} first)")
    return path


MODEL_NAMES = {
    "smollm2-135m": "SmolLM2-135M-Instruct",
    "gemma3-270m": "Gemma-3-270M",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct",
}


def run_of(summary: dict) -> tuple[str, int]:
    """``(model, length)`` an analysis measured: its fields, or (results written before they were
    recorded) the ``--model`` / ``--length`` of its command, with the command's defaults."""
    args = shlex.split(summary.get("command", "").strip("`"))
    given = {a: b for a, b in zip(args, args[1:], strict=False) if a.startswith("--")}
    model = summary.get("model") or given.get("--model", "smollm2-135m")
    return model, int(summary.get("length") or given.get("--length", 2048))


def layer_statement(summary: dict) -> str:
    """Per budget: the layers where DBAC's prefix fitting rate is at least top-k's, and its worst
    layer; plain sentences computed from ``fit_by_layer``."""
    out = []
    for b in sorted(summary["methods"], key=int):
        cells = summary["methods"][b]
        topk = cells["topk"]["fit_by_layer"]
        for dbac in [m for m in ("dbac", "dbac_tuned") if m in cells]:
            mine = cells[dbac]["fit_by_layer"]
            diff = [x - y for x, y in zip(mine, topk, strict=True)]
            if max(map(abs, diff)) < 5e-4:
                out.append(f"B={b}: {METHOD_NAMES[dbac]} equals top-k in every layer")
                continue
            level = [i for i, d in enumerate(diff) if d >= -5e-4]
            worst, best = (f(range(len(diff)), key=diff.__getitem__) for f in (min, max))
            if not level:
                out.append(
                    f"B={b}: {METHOD_NAMES[dbac]} is below top-k in all {len(diff)} compressible layers, "
                    f"by {_pct(-diff[best])} (layer {best}) to {_pct(-diff[worst])} points (layer {worst})"
                )
                continue
            switch = sum(max(x, y) for x, y in zip(mine, topk, strict=True)) / len(diff)
            out.append(
                f"B={b}: {METHOD_NAMES[dbac]} is at or above top-k in {len(level)} of {len(diff)} "
                f"compressible layers ({', '.join(map(str, level))}), by up to {_pct(diff[best])} points; "
                f"worst {_pct(-diff[worst])} points below (layer {worst}). Taking per layer the better of "
                f"the two, chosen on these same traces (an upper bound for any per-layer setting), covers "
                f"{_pct(switch)} % against top-k's {_pct(sum(topk) / len(topk))} %"
            )
    return "\n".join(f"- {line}" for line in out)


def other_runs_section(dirs: list[Path], doc: Path) -> list[str]:
    """Section (e): the prefix fitting and hit rates of the analyses in ``dirs`` (other lengths or
    models, each with its own full report ``README.md``), one row per run and method."""
    runs = [(Path(d), json.loads(analysis_json(d).read_text())) for d in dirs]
    budgets = sorted({b for _, s in runs for b in s["methods"]}, key=int)
    header = ["model", "length", "traces", "method"]
    header += [f"{q} B={b}" for b in budgets for q in ("fit prefix", "hit prefix")]
    rows, lines = [], []
    for d, s in runs:
        model, length = run_of(s)
        name = MODEL_NAMES.get(model, model)
        report = d / "README.md"
        label = f"[{name}]({os.path.relpath(report, doc.parent)})" if report.exists() else name
        for method in s["methods"][min(s["methods"], key=int)]:
            cells = [label, str(length), str(len(s["per_trace"])), METHOD_NAMES.get(method, method)]
            rows.append(cells + method_cells(s, method, budgets, ["fit_prefix", "hit_prefix"]))
        lines += [f"{name}, {length} tokens, {line}" for line in comparison_lines(s)]
    return [
        "### (e) Other lengths and models",
        "",
        "The same measurements on the runs below (each links to its full report with figures):",
        "",
        _table(header, rows),
        "",
        "Comparisons (prefix fitting rate):",
        "",
        *[f"- {line}" for line in lines],
        "",
    ]


def curve_table(summary: dict) -> str:
    curve = summary["curve"]
    rows = [
        [b, _pct(c["token_share"]), _pct(c["dbac"]), _pct(c["topk"]), _pct(c["oracle"])]
        for b, c in sorted(curve.items(), key=lambda kv: int(kv[0]))
    ]
    return _table(["budget", "% prefix tokens kept", "DBAC % mass", "top-k % mass", "oracle % mass"], rows)


def write_report(
    doc: str | Path,
    out_dir: str | Path,
    profiles: list[str | Path],
    command: str,
    others: list[str | Path] = (),
) -> Path:
    """Write ``doc`` from ``out_dir/analysis.json`` and the profile JSONs, with a summary of the
    analyses in ``others`` (other lengths or models); returns its path."""
    doc, out_dir = Path(doc), Path(out_dir)
    loaded = [json.loads(Path(p).read_text()) for p in profiles]
    summary = json.loads((out_dir / "analysis.json").read_text())
    command = summary.get("command", command)  # the run that measured, not a later --report-only
    rel = lambda p: os.path.relpath(p, doc.parent)  # noqa: E731
    model, length = run_of(summary)
    parts = [
        f"# Profiling and analysis of attention clusters ({MODEL_NAMES.get(model, model)}, CPU)",
        "",
        f"Regenerate everything on this page with `make analysis` ({command}). Definitions: "
        "`src/clusterattn/analysis/` (one module per quantity). Budget B = prompt tokens kept per KV "
        "head, observation window of 32 included; every method keeps exactly B - 32 prefix tokens.",
        "",
    ]
    profiling = [
        "## 1. Profiling num_block per task",
        "",
        "A seeded share of each task's samples (`--fraction`, 20 % unless the table's counts say "
        "otherwise) is traced with the full cache: greedy decode, each decode "
        "query's post-RoPE attention over the prompt recorded per layer and head (stopping at the end of "
        "the answer). For every candidate num_block the press's own selection runs on the recorded "
        "prefill alone, and scores the cosine between the full decode attention and the attention "
        "restricted to the kept tokens (renormalised), averaged over steps, heads, layers and samples. "
        "The best candidate per budget is stored with its budget in the profile JSON "
        "(`ClusterAttnPress.from_profile(path, budget=B)`); the other samples are held out. "
        "Profiles with the objective `answer` rank the candidates instead by the mean teacher-forced "
        "log-probability (log p) their compressed cache gives to the full cache's own answer.",
        "",
    ]
    if not loaded:
        parts += [*profiling[:2], "No profile was given for this run: DBAC keeps its default num_block.", ""]
    else:
        # the cosine curves with the cosine objective's choices: other objectives share the curves
        cosine = [p for p in loaded if objective_of(p) == "cosine"] or loaded
        fig = figures.profile_figure(cosine, out_dir / "profile_cosine.png")
        parts += profiling + [profile_section(loaded), "", f"![profile cosine]({rel(fig)})", ""]
    budgets = sorted(summary["methods"], key=int)
    tasks = sorted(summary["by_task"])
    n = len(summary["per_trace"])
    parts += [
        "## 2. Attention clusters during decoding",
        "",
        f"{n} traced {length}-token samples ({', '.join(tasks)}), each decode step's attention over the "
        "prompt; kept sets are computed from the observation window only, as the press does at the end "
        "of prefill.",
        "",
        "### (a) Per-head attention over the prompt",
        "",
    ]
    parts += [
        f"![heads {t}]({rel(out_dir / f'heads_{t}.png')})"
        for t in tasks
        if (out_dir / f"heads_{t}.png").exists()
    ]
    parts += [
        "",
        "Rows are the query heads of (up to) six evenly spaced compressible layers; colour is the "
        "decode attention averaged over the steps (log scale, each row relative to its maximum after "
        "token 0). The right panels show what DBAC and plain top-k keep from the window's scores at B=128.",
        "",
        "### (b) Hit rate and stability",
        "",
        "Share of each decode step's 16 most-attended tokens that the window-derived set keeps "
        "(prefix: the window left out; prompt: window included), mean over steps, heads, layers, samples:",
        "",
        methods_table(summary, [("hit_prefix", "hit prefix"), ("hit_prompt", "hit prompt")]),
        "",
        f"![stability]({rel(out_dir / 'stability.png')})",
        "",
        "### (c) Share of tokens vs share of attention mass",
        "",
        "Prefix tokens kept (share) against the share of the decode attention on the prefix they hold:",
        "",
        curve_table(summary),
        "",
        f"![share curve]({rel(out_dir / 'share_curve.png')})",
        "",
        "### (d) Fitting rate: clustering methods at equal budget",
        "",
        "Fitting rate = share of the later decode steps' attention mass that the kept set covers "
        "(prefix: over the prefix only, the window being kept by all; prompt: over the whole prompt); "
        "cosine = the profiling objective.",
        "",
        methods_table(
            summary, [("fit_prefix", "fit prefix"), ("fit_prompt", "fit prompt"), ("cosine", "cos")]
        ),
        "",
        f"![fitting rate]({rel(out_dir / 'fitting_rate.png')})",
        "",
        "Prefix fitting rate per task:",
        "",
        by_task_table(
            summary,
            "fit_prefix",
            [
                m
                for m in ("dbac", "dbac_tuned", "kmeans", "dbscan", "topk")
                if m in summary["methods"][budgets[0]]
            ],
        ),
        "",
        "Comparisons (prefix fitting rate):",
        "",
        comparisons(summary),
        "",
        "Prefix fitting rate per layer (mean over traces):",
        "",
        f"![fitting rate per layer]({rel(figures.layer_figure(summary, out_dir / 'fitting_by_layer.png'))})",
        "",
        layer_statement(summary),
        "",
    ]
    if others:
        parts += other_runs_section([Path(o) for o in others], doc)
    notes = out_dir / "notes.md"
    if notes.exists():  # hand-written reading of the numbers, kept across regenerations
        parts += ["## 3. What the numbers say", "", notes.read_text().strip(), ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts) + "\n")
    return doc
