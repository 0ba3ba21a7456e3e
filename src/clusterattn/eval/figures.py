"""The README's picture: what ClusterAttn keeps versus SnapKV's top-k, on a real needle prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from clusterattn.eval.niah import make_needle_sample
from clusterattn.presses import ClusterAttnPress, SnapKVPress
from clusterattn.scoring import window_scores
from clusterattn.steps import prepare_inputs, record_prefill


@torch.no_grad()
def kept_clusters_figure(model, tokenizer, path: str | Path, *, n_tokens=2048, budget=128, seed=3) -> Path:
    """Plot one head's window scores around the needle and the tokens each press keeps.

    The layer and KV head shown are those whose window scores put the most mass on the needle.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = make_needle_sample(tokenizer, n_tokens, depth=0.4, seed=seed)
    inputs = prepare_inputs(
        model,
        tokenizer,
        sample.context,
        sample.question,
        max_new_tokens=1,
        query_aware=True,
        answer_prefix=" " + sample.answer_prefix,
        chat=True,
    )
    record, _ = record_prefill(model, inputs)  # the full cache, every layer's queries recorded
    cache = record.cache
    ids = inputs.prompt_ids[0].tolist()
    text = tokenizer.decode(ids)
    start_char = text.index(sample.answer)
    pieces = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    first = next(i for i, end in enumerate(pieces) if end > start_char)
    needle = range(first, first + len(tokenizer(sample.answer, add_special_tokens=False)["input_ids"]) + 1)
    presses = {"ClusterAttn": ClusterAttnPress(budget=budget), "SnapKV (top-k)": SnapKVPress(budget=budget)}
    best = None
    for rank, layer in enumerate(record.layers):
        key = cache.layers[layer].keys
        scores = window_scores(record.queries[rank], key, record.scaling[rank], 32)[0]  # (kv, prefix)
        mass = scores[:, needle.start : needle.stop].sum(-1) / scores.sum(-1)
        head = int(mass.argmax())
        if best is None or mass[head] > best[0]:
            best = (float(mass[head]), rank, layer, head, scores[head])
    _, rank, layer, head, scores = best
    key = cache.layers[layer].keys
    lo, hi = max(0, needle.start - 60), min(scores.shape[0], needle.stop + 60)
    fig, axes = plt.subplots(3, 1, figsize=(10, 5.2), sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})
    axes[0].bar(range(lo, hi), scores[lo:hi].tolist(), color="grey", width=1.0)
    axes[0].axvspan(needle.start - 0.5, needle.stop - 0.5, color="gold", alpha=0.4, label="needle value")
    axes[0].set_ylabel("window score")
    axes[0].legend(loc="upper right")
    axes[0].set_title(f"layer {layer}, KV head {head}: tokens {lo}-{hi} of {key.shape[2]} (budget {budget})")
    for ax, (name, press) in zip(axes[1:], presses.items(), strict=True):
        kept = press.select(record.queries[rank], key, record.scaling[rank], layer=rank,
                            n_layers=len(record.layers))[0, head]  # fmt: skip
        kept = [i for i in kept.tolist() if lo <= i < hi]
        ax.bar(kept, [1] * len(kept), width=1.0, color="tab:blue" if "Cluster" in name else "tab:red")
        ax.axvspan(needle.start - 0.5, needle.stop - 0.5, color="gold", alpha=0.4)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("prompt position")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
