"""Long-context bench on a CUDA GPU (32k-128k tokens): the same measurement code as
``clusterattn bench`` (:func:`clusterattn.bench.measure_model` and
:func:`clusterattn.bench.throughput_model`), run on models built from their published
configurations.

The GPU machine has no network and takes at most 64 MiB of files, so no trained weights travel:
every model is built from its configuration with random weights (seed 0). Times and memory depend
on the shapes, not on the weight values; which tokens a press keeps does depend on them, so this
bench says nothing about accuracy. Shapes:

- ``smollm2-135m``: SmolLM2-135M's own ``config.json`` (30 layers, 9 query / 3 KV heads).
- ``llama-3.1-8b``: Llama-3.1-8B's published configuration (32 layers, 32 query / 8 KV heads,
  head_dim 128, llama3 RoPE scaling to 128k), the size of model the ClusterAttn paper measures.

Two steps::

    # here (CPU, project environment): tokenizer, SmolLM2 config and 128k essay token ids
    .venv/bin/python benchmarks/gpu_bench.py prepare --out runs/gpu-inputs
    # on the GPU machine (its own torch and transformers), carrying runs/gpu-inputs
    PYTHONPATH=src python3 benchmarks/gpu_bench.py run --inputs runs/gpu-inputs --out $OUT
    # here again: the Markdown table for docs/benchmarks.md
    .venv/bin/python benchmarks/gpu_bench.py report docs/bench-gpu/gpu_bench.json

``run`` writes ``gpu_bench.json`` after every case, so a run stopped at its deadline keeps what it
measured; a failed case is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

LLAMA_31_8B = {  # meta-llama/Llama-3.1-8B config.json (the fields that set shapes and positions)
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}  # fmt: skip
SMOLLM2_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def prepare(out: Path, length: int) -> None:
    """Write SmolLM2's config and tokenizer (no weights) and ``length`` essay token ids to ``out``."""
    from clusterattn.eval.niah import load_essays
    from clusterattn.models import converted_dir, load_model

    load_model("smollm2-135m")  # converts the registry model once if needed
    out.mkdir(parents=True, exist_ok=True)
    for name in SMOLLM2_FILES:
        shutil.copy(converted_dir("smollm2-135m") / name, out / name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = load_essays()
    ids = tokenizer(text[: length * 6], add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"the essays give {len(ids)} tokens, fewer than {length}")
    torch.save(torch.tensor(ids[:length], dtype=torch.int32), out / "ids.pt")
    print(f"wrote {out}: {len(SMOLLM2_FILES)} SmolLM2 files and {length} token ids")


def random_model(shape: str, inputs: Path, device: str, dtype: torch.dtype, max_length: int):
    """A causal LM of ``shape`` with random weights (seed 0), in eval mode on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if shape == "smollm2-135m":
        config = AutoConfig.from_pretrained(inputs)
    elif shape == "llama-3.1-8b":
        config = LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items() if k != "model_type"})
    else:
        raise ValueError(f"unknown shape {shape!r}: smollm2-135m or llama-3.1-8b")
    config.max_position_embeddings = max(config.max_position_embeddings, max_length)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def run(args) -> int:
    from transformers import AutoTokenizer

    from clusterattn.bench import Case, make_press, measure_model, throughput_model

    for press in args.presses:  # bad names or a missing budget fail before any model is built
        make_press(press, args.budget)
    ids = torch.load(Path(args.inputs) / "ids.pt").long()
    if max(*args.lengths, args.throughput_length) > ids.numel():
        raise ValueError(f"{args.inputs}/ids.pt holds {ids.numel()} tokens: prepare a larger --length")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.inputs)
    report = {"device": _device_info(args.device), "args": vars(args), "cases": [], "throughput": []}

    def save() -> None:
        (out / "gpu_bench.json").write_text(json.dumps(report, indent=1))

    def attempt(kind: str, fn, case: Case) -> None:
        left = args.deadline - (time.perf_counter() - began)
        if left <= 0:
            report[kind].append({**asdict(case), "error": "skipped: deadline reached"})
            return
        try:
            row = fn(case)
            report[kind].append(row)
            print(f"[{time.perf_counter() - began:6.0f} s] {kind} {_summary(row)}", flush=True)
        except Exception as exc:  # recorded, the run goes on
            report[kind].append({**asdict(case), "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
        save()

    for shape, cap_gb in zip(args.shapes, args.cap_gb, strict=True):
        model = random_model(shape, Path(args.inputs), args.device, dtype, max(args.lengths))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        report.setdefault("weights_bytes", {})[shape] = weights
        common = {"batch": 1, "threads": 1, "device": args.device, "dtype": args.dtype}
        # warm-up (kernel selection, allocator) at a short length, unmeasured
        short = min(4096, *args.lengths)
        warm = Case(shape, short, "clusterattn", args.budget, new_tokens=4, repeats=1, **common)
        measure_model(model, tokenizer, warm, ids)
        for length, decode, press in itertools.product(args.lengths, args.decode, args.presses):
            budget = None if press == "full" else args.budget
            case = Case(
                shape, length, press, budget, new_tokens=args.new_tokens, repeats=args.repeats, **common,
                compile=None if decode == "eager" else args.compile_backend, prefill_chunk=args.prefill_chunk,
            )  # fmt: skip
            attempt("cases", partial(measure_model, model, tokenizer, ids=ids), case)
        measure_cap = partial(throughput_model, model, tokenizer, cap_bytes=int(cap_gb * 2**30),
                              max_batch=args.max_batch, ids=ids)  # fmt: skip
        for press in args.presses:
            budget = None if press == "full" else args.budget
            case = Case(shape, args.throughput_length, press, budget, new_tokens=16, repeats=1, **common)
            attempt("throughput", measure_cap, case)
        del model, measure_cap
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - began
    save()
    print(markdown(report))
    return 0


def _device_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.device(device).type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def _summary(row: dict) -> str:
    keys = ("model", "length", "press", "budget", "prefill_s", "compress_s", "decode_ms_per_token",
            "peak_device_bytes", "max_batch", "decode_tokens_per_s")  # fmt: skip
    return " ".join(
        f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row
    )  # noqa: E501


def markdown(report: dict) -> str:
    """Latency / memory and throughput tables, ratios against the full cache of the same shape and
    length."""
    from clusterattn.bench import ratio_rows
    from clusterattn.bench_report import decode_path

    gib, lines = 2**30, []
    rows = ratio_rows([r for r in report["cases"] if "error" not in r])
    lines += [
        "| shape | length | decode | press | budget | prefill s | compress s (share) | decode ms/tok "
        "| floor ms/tok (x floor) | decode speed-up | KV GiB | peak GPU GiB (x full) |",
        "|" + "---|" * 12,
    ]
    for r in rows:  # ratios against the full cache of the same shape, length and path (bench.ratio_rows)
        floor = (
            "-"
            if "floor_ms_per_token" not in r
            else f"{r['floor_ms_per_token']:.2f} ({r['decode_vs_floor']:.2f}x)"
        )
        lines.append(
            f"| {r['model']} | {r['length']} | {decode_path(r)} | {r['press']} | {r['budget'] or '-'} "
            f"| {r['prefill_s']:.2f} "
            f"| {r['compress_s']:.3f} ({100 * r['compress_share']:.1f} %) | {r['decode_ms_per_token']:.2f} "
            f"| {floor} | {r.get('decode_speedup', 1):.2f}x | {r['kv_bytes'] / gib:.3f} "
            f"| {r['peak_device_bytes'] / gib:.1f} ({r.get('peak_device_ratio', 1):.2f}) |"
        )
    lines += ["", "| shape | length | press | budget | cap GiB | largest batch | decode tok/s | peak GiB "
              "| fits |", "|" + "---|" * 9]  # fmt: skip
    for r in report["throughput"]:
        if "error" in r:
            continue
        lines.append(
            f"| {r['model']} | {r['length']} | {r['press']} | {r['budget'] or '-'} "
            f"| {r['cap_bytes'] / gib:g} | {r['max_batch']} | {r['decode_tokens_per_s']:.0f} "
            f"| {r['peak_bytes'] / gib:.1f} | {r['fits']} |"
        )
    failed = [r for kind in ("cases", "throughput") for r in report[kind] if "error" in r]
    lines += [f"\nNot measured: {r['model']} {r['length']} {r['press']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Peak GPU memory against context length (left) and decode throughput under the cap (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in report["cases"] if "error" not in r]
    for shape in dict.fromkeys(r["model"] for r in rows):
        for press in dict.fromkeys(r["press"] for r in rows if r["model"] == shape):
            group = sorted(
                (r for r in rows if (r["model"], r["press"]) == (shape, press)), key=lambda r: r["length"]
            )
            label = f"{shape}: {press}" + ("" if group[0]["budget"] is None else f" B={group[0]['budget']}")
            left.plot(
                [r["length"] for r in group],
                [r["peak_device_bytes"] / 2**30 for r in group],
                "o-",
                label=label,
            )
    left.set(xscale="log", xlabel="context length (tokens)", ylabel="GiB", title="peak GPU memory, batch 1")
    left.set_xscale("log", base=2)
    tp = [r for r in report["throughput"] if "error" not in r]
    labels = [f"{r['model']}\n{r['press']} (batch {r['max_batch']})" for r in tp]
    right.barh(labels, [r["decode_tokens_per_s"] for r in tp], color="tab:blue")
    right.set(
        xscale="log", xlabel="decode tokens / s", title="largest batch under the memory cap, 32k prompts"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the inputs folder (run here, in .venv)")
    prep.add_argument("--out", default="runs/gpu-inputs")
    prep.add_argument("--length", type=int, default=131072)
    go = sub.add_parser("run", help="measure (on the GPU machine)")
    go.add_argument("--inputs", default="runs/gpu-inputs")
    go.add_argument("--out", default="runs/gpu-bench")
    go.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "smollm2-135m"])
    go.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    go.add_argument("--presses", nargs="+", default=["full", "clusterattn", "snapkv"])
    go.add_argument("--budget", type=int, default=1024)
    go.add_argument("--new-tokens", type=int, default=32)
    go.add_argument("--repeats", type=int, default=2)
    go.add_argument("--throughput-length", type=int, default=32768)
    go.add_argument("--cap-gb", type=float, nargs="+", default=[80.0, 8.0], help="memory cap per shape")
    go.add_argument("--max-batch", type=int, default=512)
    go.add_argument("--device", default="cuda")
    go.add_argument("--dtype", default="bfloat16")
    go.add_argument(
        "--decode",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="decode paths: eager (dynamic cache) and/or compiled (static cache, compiled step)",
    )
    go.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled path"
    )
    go.add_argument(
        "--prefill-chunk", type=int, default=None, help="prefill tokens per layer call (default: all)"
    )
    go.add_argument("--deadline", type=float, default=420.0, help="seconds after which cases are skipped")
    rep = sub.add_parser("report", help="print the Markdown tables of a gpu_bench.json")
    rep.add_argument("path")
    rep.add_argument("--png", default=None, help="also draw the figure to this file")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.out), args.length)
        return 0
    if args.command == "report":
        report = json.loads(Path(args.path).read_text())
        print(markdown(report))
        if args.png:
            plot(report, Path(args.png))
        return 0
    if len(args.cap_gb) != len(args.shapes):
        parser.error("--cap-gb needs one value per --shapes entry")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
