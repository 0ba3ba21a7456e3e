"""Figures of the analysis (PNG, matplotlib Agg): attention clusters across heads, stability over
decode steps, share of tokens versus share of attention mass, fitting rate per method."""

from __future__ import annotations

from pathlib import Path

import torch

from clusterattn.analysis.analyze import method_masks
from clusterattn.analysis.metrics import per_query_head
from clusterattn.analysis.trace import DecodeTrace

COLOURS = {
    "dbac": "tab:blue",
    "kmeans": "tab:orange",
    "dbscan": "tab:green",
    "topk": "tab:red",
    "snapkv": "tab:purple",
    "oracle": "grey",
    "dbac_tuned": "navy",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def heads_heatmap(trace: DecodeTrace, path, *, budget: int = 128, n_layers: int = 6, title: str = "") -> Path:
    """Figure 1 style: mean decode attention over the prompt for every query head of ``n_layers``
    evenly spaced layers (rows), each row scaled to its own maximum on a log scale, next to the
    tokens DBAC and top-k keep from the window at ``budget``."""
    plt = _plt()
    layers = torch.linspace(0, len(trace.layers) - 1, n_layers).round().long().unique()
    q_heads = trace.attention.shape[1]
    mean = trace.attention[layers].mean(dim=2)  # (n, q_heads, seq)
    rows = mean / mean[..., 1:].amax(dim=-1, keepdim=True).clamp_min(1e-30)  # token 0 (the sink) saturates
    image = rows.clamp(1e-3, 1.0).log10().flatten(0, 1)
    masks = method_masks(trace, budget, ("dbac", "topk"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.5), sharey=True, gridspec_kw={"width_ratios": [2.2, 1, 1]})
    shown = axes[0].imshow(image, aspect="auto", cmap="magma", interpolation="nearest", vmin=-3, vmax=0)
    axes[0].set_title("decode attention, mean over steps (log10 of the row's max after token 0)")
    fig.colorbar(shown, ax=axes[0], fraction=0.03)
    for ax, name in zip(axes[1:], ("dbac", "topk"), strict=True):
        kept = per_query_head(masks[name][layers], q_heads).squeeze(-2).flatten(0, 1).float()
        ax.imshow(kept, aspect="auto", cmap="Blues" if name == "dbac" else "Reds", interpolation="nearest")
        ax.set_title(f"kept by {'DBAC' if name == 'dbac' else 'top-k'} (B={budget})")
    for ax in axes:
        ax.set_xlabel("prompt position")
        for boundary in range(q_heads, image.shape[0], q_heads):
            ax.axhline(boundary - 0.5, color="white" if ax is axes[0] else "grey", lw=0.6)
    axes[0].set_yticks([i * q_heads + q_heads // 2 for i in range(len(layers))])
    axes[0].set_yticklabels([f"layer {trace.layers[int(i)]}" for i in layers])
    fig.suptitle(
        title or f"{trace.seq}-token prompt, {trace.steps} decode steps: query heads of {len(layers)} layers"
    )
    fig.tight_layout()
    return _save(fig, path)


def stability_figure(summary: dict, path, budget: str) -> Path:
    """Hit rate (prefix, top tokens) of each method's window-derived set at every decode step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, cell in summary["methods"][budget].items():
        steps = cell["hit_by_step"]
        ax.plot(range(1, len(steps) + 1), steps, label=method, color=COLOURS.get(method), marker=".")
    ax.set_xlabel("decode step")
    ax.set_ylabel("hit rate (top tokens of the step kept)")
    ax.set_title(f"window-derived kept set vs later decode steps, B={budget}")
    ax.set_ylim(0, 1)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def share_curve(summary: dict, path) -> Path:
    """Share of prefix tokens kept versus share of the decode attention mass they hold."""
    plt = _plt()
    curve = summary["curve"]
    budgets = sorted(curve, key=int)
    x = [curve[b]["token_share"] * 100 for b in budgets]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in ("oracle", "topk", "dbac"):
        ax.plot(x, [curve[b][method] * 100 for b in budgets], marker="o", label=method, color=COLOURS[method])
    ax.plot(x, x, ls="--", color="black", lw=0.8, label="uniform")
    for b, xi in zip(budgets, x, strict=True):
        ax.annotate(
            f"B={b}", (xi, curve[b]["dbac"] * 100), textcoords="offset points", xytext=(4, -10), fontsize=7
        )
    ax.set_xlabel("% of prefix tokens kept")
    ax.set_ylabel("% of decode attention mass on the prefix they hold")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def fitting_bars(summary: dict, path, quantity: str = "fit_prefix") -> Path:
    """Grouped bars: ``quantity`` of each method at each budget."""
    plt = _plt()
    budgets = sorted(summary["methods"], key=int)
    methods = list(summary["methods"][budgets[0]])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [summary["methods"][b][method][quantity] * 100 for b in budgets]
        xs = [j + i * width for j in range(len(budgets))]
        ax.bar(xs, values, width, label=method, color=COLOURS.get(method))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))])
    ax.set_xticklabels([f"B={b}" for b in budgets])
    ax.set_ylabel(f"{quantity} (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def profile_figure(profiles: list[dict], path) -> Path:
    """Profiling cosine against ``num_block`` for every task (one panel per budget)."""
    plt = _plt()
    budgets = sorted({b for p in profiles for b in p["budgets"]}, key=int)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        for profile in profiles:
            rows = [
                r
                for r in profile["grid"]
                if str(r["budget"]) == budget and r["alpha"] == 1.0 and r["window_size"] == 32
            ]
            rows.sort(key=lambda r: r["num_block"])
            if not rows:
                continue
            label = f"{Path(profile['task']).stem} ({profile['length']})"
            line = ax.plot(
                [r["num_block"] for r in rows], [r["cosine"] for r in rows], marker=".", label=label
            )
            best = profile["budgets"][budget]["config"]["num_block"]
            chosen = [r for r in rows if r["num_block"] == best]
            if chosen:
                ax.plot(best, chosen[0]["cosine"], marker="*", ms=12, color=line[0].get_color())
        default = profiles[0]["budgets"][budget]["default_config"]["num_block"]
        ax.axvline(default, color="grey", ls=":", label=f"default ({default})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("num_block (clusters); the last point is top-k")
        ax.set_ylabel("restricted-attention cosine")
        ax.set_title(f"B={budget} (star: chosen)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


LAYER_METHODS = ("oracle", "topk", "dbac_tuned", "dbac", "dbscan")


def layer_figure(summary: dict, path, quantity: str = "fit_by_layer") -> Path:
    """Prefix fitting rate per compressible layer of the clustering methods (one panel per budget):
    where the attention is clustered, DBAC's spans hold as much mass as top-k's scattered tokens."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    budgets = sorted(summary["methods"], key=int)
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 3.8), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets, strict=True):
        cells = summary["methods"][budget]
        for method in [m for m in LAYER_METHODS if m in cells]:
            values = [v * 100 for v in cells[method][quantity]]
            ax.plot(range(len(values)), values, marker=".", label=method, color=COLOURS.get(method))
        ax.set_xlabel("compressible layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_title(f"B={budget}")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("prefix fitting rate (%)")
    fig.tight_layout()
    return _save(fig, path)
