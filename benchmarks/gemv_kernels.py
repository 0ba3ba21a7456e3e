"""One token's matrix-vector products on CPU with three kernels, beside the copy bandwidth.

The compiled decode of `clusterattn bench` sits about 1.2x above `clusterattn.bench_floor.matvec_ms`
(torch's own `F.linear`), which reads the weights far below the machine's copy bandwidth. This asks
whether another CPU kernel reads them faster, and whether it gives the same numbers: `F.linear`
(MKL's GEMV), MKL's packed GEMM (`torch.ops.mkl._mkl_linear`, what inductor's freezing uses for
fp32 weights) and oneDNN's packed linear (`torch.ops.mkldnn._linear_pointwise`, what it uses for
bf16). Per kernel: milliseconds for every linear weight once (median of `--repeats` passes), the
weights' read rate, and the largest difference of its outputs from `F.linear`'s.

    .venv/bin/python benchmarks/gemv_kernels.py --model smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import clusterattn as ca
from clusterattn.bench_floor import copy_bandwidth, linear_weights


def kernels(weights: list[torch.Tensor]) -> dict:
    """Per kernel name, a list of callables ``x -> (1, out)``, one per weight."""
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in weights]
    dnn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]

    def mkl_packed(p, w):
        return lambda x: torch.ops.mkl._mkl_linear(x, p, w, None, 1)

    def dnn_packed(p):
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    return {
        "F.linear (MKL GEMV)": [lambda x, w=w: F.linear(x, w) for w in weights],
        "MKL packed": [mkl_packed(p, w) for p, w in zip(mkl, weights, strict=True)],
        "oneDNN packed": [dnn_packed(p) for p in dnn],
    }


@torch.no_grad()
def measure(model_name: str, repeats: int) -> tuple[list[dict], int]:
    model, _ = ca.load_model(model_name)
    weights = [w.detach().contiguous() for w in linear_weights(model)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    inputs = [torch.randn(1, w.shape[1]) for w in weights]
    reference = [F.linear(x, w) for x, w in zip(inputs, weights, strict=True)]
    rows = []
    for name, calls in kernels(weights).items():
        outputs = [call(x) for call, x in zip(calls, inputs, strict=True)]  # also the untimed pass
        diff = max((o - r).abs().max().item() for o, r in zip(outputs, reference, strict=True))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for call, x in zip(calls, inputs, strict=True):
                call(x)
            times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        rows.append({"kernel": name, "ms": ms, "gb_s": nbytes / ms / 1e6, "max_diff": diff})
    return rows, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="registry name or path (fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, nbytes = measure(args.model, args.repeats)
    bandwidth = copy_bandwidth("cpu")
    read = nbytes / bandwidth * 1e3
    print(
        f"{args.model}: {nbytes / 2**20:.0f} MiB of linear weights, {args.threads} threads; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (read + written), {read:.1f} ms for these bytes"
    )
    print("| kernel | ms per token | weights read, GB/s | max abs diff from F.linear |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['ms']:.2f} | {r['gb_s']:.1f} | {r['max_diff']:.2g} |")


if __name__ == "__main__":
    main()
