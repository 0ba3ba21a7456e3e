"""Time our compression step (scoring + selection + gather, all layers) on one essay prompt.

    .venv/bin/python benchmarks/compress_time.py --length 8192 --ids runs/ids-8192.pt

Writes the prompt's token ids to ``--ids`` (for ``kvpress_compress_time.py``, the same input in
kvpress's environment) and prints one JSON line per press: median compression seconds over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import clusterattn as ca
from clusterattn.bench import prompt_inputs
from clusterattn.generation import _prefill
from clusterattn.integration import new_cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ca.load_model("smollm2-135m")
    inputs = prompt_inputs(tokenizer, args.length, 1, "cpu")
    Path(args.ids).parent.mkdir(parents=True, exist_ok=True)
    torch.save(inputs.prompt_ids.clone(), args.ids)
    for press in (ca.SnapKVPress(budget=args.budget), ca.ClusterAttnPress(budget=args.budget)):
        seconds = []
        for _ in range(args.repeats):
            with torch.no_grad(), press(model) as session:
                _prefill(model, inputs, new_cache(model))
            seconds.append(session.stats.seconds)
        print(json.dumps({"press": type(press).__name__, "length": args.length,
                          "compress_s": statistics.median(seconds)}))  # fmt: skip


if __name__ == "__main__":
    main()
