"""Time kvpress's SnapKV compression step on the same prompt as ours (run in kvpress's environment).

Usage (from the repository root, after ``make peers``):

    .venv/bin/python benchmarks/compress_time.py --length 8192 --ids runs/ids-8192.pt     # ours, writes ids
    .venv-peers/bin/python benchmarks/kvpress_compress_time.py --ids runs/ids-8192.pt --budget 512

Prints one JSON line: total seconds kvpress spends in ``compress`` over all layers during one
prefill, and the prefill's wall time. Uses the converted SmolLM2 folder that ``load_model`` caches.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, DynamicCache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", required=True, help="a .pt file with a (1, L) LongTensor of token ids")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    default_dir = Path(os.environ.get("CLUSTERATTN_CACHE", Path.home() / ".cache/clusterattn/models"))
    parser.add_argument("--model-dir", default=str(default_dir / "smollm2-135m"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.load(args.ids)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    length = ids.shape[1]
    press = SnapKVPress(compression_ratio=1 - args.budget / length, window_size=args.window)
    spent = [0.0]
    original = press.compress

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        spent[0] += time.perf_counter() - start
        return out

    press.compress = timed
    runs = []
    for _ in range(args.repeats):
        spent[0] = 0.0
        cache = DynamicCache()
        start = time.perf_counter()
        with torch.no_grad(), press(model):
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        runs.append({"compress_s": spent[0], "prefill_s": time.perf_counter() - start,
                     "kept": cache.layers[0].keys.shape[2]})  # fmt: skip
    runs.sort(key=lambda r: r["compress_s"])
    print(json.dumps({"press": "kvpress SnapKV", "length": length, **runs[len(runs) // 2]}))


if __name__ == "__main__":
    main()
