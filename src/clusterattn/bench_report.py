"""The report of ``clusterattn bench``: ratios against the full cache, the Markdown tables and the
plot, all from the rows that :mod:`clusterattn.bench` measured (so a ``bench.json`` can be re-rendered
without measuring again)."""

from __future__ import annotations

from pathlib import Path

from clusterattn.bench_selection import selection_markdown


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Add ratios against the full-cache row of the same model, length, batch, decode path and
    prefill chunk."""

    def key(r: dict) -> tuple:  # the full cache on the same decode path and prefill
        return r["model"], r["length"], r["batch"], r.get("compile"), r.get("prefill_chunk")

    full = {key(r): r for r in rows if r["press"] == "full"}
    for r in rows:
        ref = full.get(key(r))
        if ref is None:
            continue
        r["decode_speedup"] = ref["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["kv_ratio"] = r["kv_bytes"] / ref["kv_bytes"]
        r["peak_kv_ratio"] = r["peak_kv_bytes"] / ref["peak_kv_bytes"]
        r["peak_rss_ratio"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
        if "peak_rss_fixed_mmap_bytes" in r and "peak_rss_fixed_mmap_bytes" in ref:
            r["peak_rss_fixed_mmap_ratio"] = r["peak_rss_fixed_mmap_bytes"] / ref["peak_rss_fixed_mmap_bytes"]
        if "peak_device_bytes" in ref:  # 0 on CPU, where there is no device memory
            r["peak_device_ratio"] = r["peak_device_bytes"] / max(ref["peak_device_bytes"], 1)
    return rows


def _ratio(row: dict, key: str, spec: str, unit: str = "") -> str:
    """A ratio against the full cache, or "-" when the run has no full-cache row to compare with
    (a run without ``full`` in its presses)."""
    return "-" if key not in row else f"{row[key]:{spec}}{unit}"


def decode_path(row: dict) -> str:
    """``eager`` (the dynamic cache, step by step) or ``compiled (backend)``; then ``, decode
    budget B / I`` for a press that also compresses while decoding, ``, prefill chunk N`` for a prefill
    run N tokens at a time through each layer."""
    path = "eager" if not row.get("compile") else f"compiled ({row['compile']})"
    if row.get("decode_budget"):
        path += f", decode budget {row['decode_budget']} / {row.get('interval', 128)}"
    return path if not row.get("prefill_chunk") else f"{path}, prefill chunk {row['prefill_chunk']}"


def markdown(rows: list[dict]) -> str:
    """The side-by-side table: one row per configuration, ratios against the full cache on the same
    decode path, and each decode time beside its memory-bandwidth floor (weights + the cache a step
    reads, over the copy bandwidth measured in the case's process: :mod:`clusterattn.bench_floor`).
    A "matvec ms/tok" column (the device's matrix-vector kernels over the weights alone,
    :func:`clusterattn.bench_floor.matvec_ms`) and a "peak RSS, fixed mmap" column appear when the rows
    carry those measurements."""
    mb = 2**20
    fixed = any("peak_rss_fixed_mmap_bytes" in r for r in rows)
    matvec = any("matvec_ms_per_token" in r for r in rows)
    head = (
        "| model | length | batch | decode | press | budget | prefill s | compress s (share) "
        "| decode ms/tok | floor ms/tok (x floor) |"
        + (" matvec ms/tok (x matvec) |" if matvec else "")
        + " tok/s "
        "| KV MB (x full) | KV MB after decode | peak KV MB (x full) | peak RSS MB (x full) |"
        + (" peak RSS MB, fixed mmap (x full) |" if fixed else "")
        + " decode speed-up |"
    )
    lines = [head, "|" + "---|" * (16 + fixed + matvec)]
    for r in rows:
        extra = ""
        if fixed:
            value = r.get("peak_rss_fixed_mmap_bytes")
            extra = (
                " - |"
                if value is None
                else f" {value / mb:.0f} ({_ratio(r, 'peak_rss_fixed_mmap_ratio', '.2f')}) |"
            )
        final = "-" if "final_kv_bytes" not in r else f"{r['final_kv_bytes'] / mb:.1f}"
        floor = "-"
        if "floor_ms_per_token" in r:  # rows of older runs have no floor
            floor = f"{r['floor_ms_per_token']:.1f} ({r['decode_vs_floor']:.2f}x)"
        gemv = ""
        if matvec:  # the column, "-" in rows of older runs
            gemv = " - |"
            if "matvec_ms_per_token" in r:
                gemv = f" {r['matvec_ms_per_token']:.1f} ({r['decode_vs_matvec']:.2f}x) |"
        lines.append(
            f"| {r['model']} | {r['length']} | {r['batch']} | {decode_path(r)} | {r['press']} "
            f"| {r['budget'] or '-'} "
            f"| {r['prefill_s']:.2f} | {r['compress_s']:.3f} ({100 * r['compress_share']:.1f} %) "
            f"| {r['decode_ms_per_token']:.1f} | {floor} |{gemv} {r['decode_tokens_per_s']:.1f} "
            f"| {r['kv_bytes'] / mb:.1f} ({_ratio(r, 'kv_ratio', '.3f')}) "
            f"| {final} "
            f"| {r['peak_kv_bytes'] / mb:.1f} ({_ratio(r, 'peak_kv_ratio', '.2f')}) "
            f"| {r['peak_rss_bytes'] / mb:.0f} ({_ratio(r, 'peak_rss_ratio', '.2f')}) |{extra}"
            f" {_ratio(r, 'decode_speedup', '.2f', 'x')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Decode latency and KV memory against context length, one line per press and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["batch"] == 1:
            label = r["press"] if r["budget"] is None else f"{r['press']} B={r['budget']}"
            label += "" if decode_path(r) == "eager" else f" ({decode_path(r)})"
            groups.setdefault(f"{r['model']}: {label}", []).append(r)
    for label, group in groups.items():
        group.sort(key=lambda r: r["length"])
        lengths = [r["length"] for r in group]
        left.plot(lengths, [r["decode_ms_per_token"] for r in group], marker="o", label=label)
        right.plot(lengths, [r["kv_bytes"] / 2**20 for r in group], marker="o", label=label)
    for ax, title in ((left, "decode latency (ms / token)"), (right, "prompt KV cache (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, cap_gb: float) -> None:
    """``bench.md`` and ``bench.png`` in ``out`` from a ``bench.json`` report."""
    rows, tp_rows = report["cases"], report["throughput"]
    # the setting each case ran with, as run_isolated recorded it (the environment's, unless fixed)
    malloc = ", ".join(sorted({str(r["malloc_mmap_threshold"]) for r in rows + tp_rows}))
    md = ["## Latency and memory", "", f"Each case in a fresh process, MALLOC_MMAP_THRESHOLD_: {malloc}."]
    fixed = sorted({str(r["rss_fixed_mmap_threshold"]) for r in rows if "rss_fixed_mmap_threshold" in r})
    if fixed:
        md.append(
            f"Peak RSS, fixed mmap: the same case once more (one repeat) in another fresh process with "
            f"MALLOC_MMAP_THRESHOLD_={', '.join(fixed)}, where glibc returns freed blocks to the system "
            f"and the peak is reproducible; every time in the table comes from the first process."
        )
    md += ["", markdown(rows)]
    if tp_rows:
        md += ["## Throughput under a memory cap", "", "| model | length | press | budget | cap GB | batch "
               "| tokens/s | peak RSS GB | fits |", "|" + "---|" * 9]  # fmt: skip
        for r in tp_rows:
            md.append(
                f"| {r['model']} | {r['length']} | {r['press']} | {r['budget'] or '-'} | {cap_gb:g} "
                f"| {r['max_batch']} | {r['decode_tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} "
                f"| {r['fits']} |"
            )
    md += ["", "## Selection step: DBAC vs plain top-k (30 layers, same scores)", ""]
    md += selection_markdown(report["selection"])
    (out / "bench.md").write_text("\n".join(md) + "\n")
    plot(rows, out / "bench.png")
