"""Count the selections a change to ``dbac.py`` alters on real window scores.

    .venv/bin/python benchmarks/dbac_changes.py --commit 0981591

Loads ``src/clusterattn/dbac.py`` as it was at ``--commit`` beside the current one, records the
window scores ClusterAttn sees in one prefill of the essay prompt per model, and prints, per model,
how many (layer, KV head) rows keep different tokens at any of the budgets.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import clusterattn as ca
from clusterattn.bench import prompt_inputs

sys.path.insert(0, str(Path(__file__).parent))
from compress_time import window_scores_seen  # noqa: E402


def load_old(commit: str):
    """``dbac.py`` at ``commit`` as a standalone module (it imports only torch and the package)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:src/clusterattn/dbac.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "dbac_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dbac_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", required=True)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m:4096", "gemma3-270m:2048"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    args = parser.parse_args()
    old, new = load_old(args.commit), importlib.import_module("clusterattn.dbac")
    for spec in args.models:
        name, length = spec.rsplit(":", 1)
        model, tokenizer = ca.load_model(name)
        scores = window_scores_seen(model, prompt_inputs(tokenizer, int(length), 1, "cpu"), 512)
        changed = rows = 0
        for budget in args.budgets:
            for layer in scores:
                before = old.dbac(layer, budget - 32, relative_theta=32.0)
                after = new.dbac(layer, budget - 32, relative_theta=32.0)
                rows += before.shape[0] * before.shape[1]
                changed += int((before != after).any(dim=-1).sum())
        print(f"{name} {length}: {changed} of {rows} (layer, head, budget) rows keep different tokens")


if __name__ == "__main__":
    main()
