"""The same answers on CUDA as on CPU: every tiny test-model family (random weights, fp32, built in
code as the unit tests build them) x every press of the unit tests x both settings, through
``clusterattn.generate`` (one prompt, and a left-padded batch of two where the press takes one)
and ``clusterattn.generate_many`` (the eval grid's shared prefill), and the compiled decode
(``generate(..., compile=...)``, full cache and ClusterAttn) on the device against the eager decode
on CPU. Tokens must match exactly.

Run where a GPU exists, from the repository root (needs only torch, transformers and pytest)::

    PYTHONPATH=src:tests python3 benchmarks/cuda_check.py --out runs/cuda-check.json

Exits 1 when any case differs or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

import clusterattn as ca
from conftest import FAMILIES, tiny_model
from test_integration import TOK, ids_text
from test_presses import PRESS_FACTORIES

BUDGET, NEW_TOKENS = 40, 6


def _padded_ok(family: str, name: str) -> bool:
    """Presses that take left-padded batches (integration.PressSession refuses the others)."""
    return family != "gemma3" and PRESS_FACTORIES[name](BUDGET).uniform_layers


def run_case(
    models: dict,
    family: str,
    name: str | None,
    query_aware: bool,
    batch: bool,
    compile_backend: str | None = None,
) -> dict:
    """One press (None: the full cache) on CPU and on the device; with ``compile_backend`` the device
    decodes with the compiled step (a static cache, the step under ``torch.compile``; grouped KV heads
    packed per KV head on CUDA) against the eager decode on CPU."""
    contexts = [ids_text(150, seed=3), ids_text(120, seed=4)] if batch else ids_text(150, seed=3)
    question = "5 6 7 8"
    out = {}
    for device, model in models.items():
        press = None if name is None else PRESS_FACTORIES[name](BUDGET)
        compile_ = None if device == "cpu" else compile_backend
        with torch._dynamo.config.patch(recompile_limit=64):  # Gemma3's own static sliding layers
            result = ca.generate(
                model, TOK, contexts, question, press=press, max_new_tokens=NEW_TOKENS,
                query_aware=query_aware, compile=compile_,
            )  # fmt: skip
        out[device] = result.tokens.cpu()
    return {"equal": bool(torch.equal(out["cpu"], out["device"])), "tokens": out["device"].tolist()}


def run_many(models: dict, family: str, query_aware: bool) -> dict:
    out = {}
    for device, model in models.items():
        presses = {name: factory(BUDGET) for name, factory in PRESS_FACTORIES.items()}
        results = ca.generate_many(
            model, TOK, ids_text(150, seed=5), "5 6 7 8", presses=presses, max_new_tokens=NEW_TOKENS,
            query_aware=query_aware,
        )  # fmt: skip
        out[device] = {name: r.tokens.cpu() for name, r in results.items()}
    differ = [name for name in out["cpu"] if not torch.equal(out["cpu"][name], out["device"][name])]
    return {"equal": not differ, "differ": differ}


def _attempt(row: dict, check, *args) -> dict:
    """``row`` with the result of ``check(*args)``, or with the error it raised (printed)."""
    try:
        return row | check(*args)
    except Exception as exc:
        traceback.print_exc()
        return row | {"equal": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/cuda-check.json")
    parser.add_argument("--device", default="cuda", help="compared against cpu ('cpu' checks the script)")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled-decode cases"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    rows = []
    for family in FAMILIES:
        cpu = tiny_model(family)
        models = {"cpu": cpu, "device": tiny_model(family).to(args.device)}
        for query_aware in (True, False):
            cases = [(name, False) for name in PRESS_FACTORIES]
            cases += [(name, True) for name in PRESS_FACTORIES if _padded_ok(family, name)]
            for name, batch in cases:
                row = {"family": family, "press": name, "query_aware": query_aware, "padded_batch": batch}
                rows.append(_attempt(row, run_case, models, family, name, query_aware, batch))
            row = {"family": family, "press": "generate_many(all)", "query_aware": query_aware}
            rows.append(_attempt(row, run_many, models, family, query_aware))
        for name in (None, "clusterattn"):
            row = {"family": family, "press": f"compiled({name or 'full'})", "backend": args.compile_backend}
            batch = name is None or _padded_ok(family, name)  # left-padded where the press takes it
            rows.append(_attempt(row, run_case, models, family, name, True, batch, args.compile_backend))
    bad = [r for r in rows if not r["equal"]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    Path(args.out).write_text(
        json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1)
    )
    print(f"{len(rows) - len(bad)} of {len(rows)} cases give the same tokens on {name} as on CPU")
    for r in bad:
        print("DIFFERS:", {k: v for k, v in r.items() if k != "tokens"})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
