"""Check the eval's kvpress rows against kvpress's own text-generation pipeline, end to end.

``clusterattn eval --peer`` replays kvpress's hooks on a recorded prefill (``peer_worker``). This
script answers the same RULER prompts with ``pipeline("kv-press-text-generation")`` itself and
compares the texts with the rows already in ``predictions.jsonl``. Only the query-agnostic setting
maps onto the pipeline (it compresses the context and appends the question).

Usage (from the repository root, after ``make peers`` and an eval run that holds the rows)::

    .venv/bin/python benchmarks/kvpress_pipeline_check.py --task niah_single_1 --budget 1024 \\
        --presses expectedattention snapkv --n 4

The first stage runs in ``.venv`` (it has the RULER data package), writes the samples to a
temporary file and starts the second stage in ``.venv-peers``. Exit status 1 if any text differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ours(args) -> int:
    import clusterattn as ca
    from clusterattn.eval.ruler import load_ruler_samples

    _, tokenizer = ca.load_model(args.model)
    samples = load_ruler_samples(args.task, args.length, args.n, tokenizer, seed=args.seed)[: args.n]
    rows = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line]
    labels = {f"kvpress:{name}" for name in args.presses}
    want = {
        f"{r['press']}|{r['index']}": r["prediction"]
        for r in rows
        if r["model"] == args.model and r["task"] == args.task and r["length"] == args.length
        and r["setting"] == "query_agnostic" and r["budget"] == str(args.budget)
        and r["press"] in labels and r.get("error") is None
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({**vars(args), "samples": [s.to_dict() for s in samples], "want": want}))
        return subprocess.call([str(ROOT / ".venv-peers/bin/python"), __file__, "--stage-peers", str(job)])


def peers(job_path: str) -> int:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import torch
    from transformers import pipeline

    import clusterattn as ca
    from clusterattn.eval.peer_worker import build_press
    from clusterattn.eval.tasks import Sample
    from clusterattn.generation import build_prompt

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    model, tokenizer = ca.load_model(job["model"])
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    verdicts = Counter()
    for sample in map(Sample.from_dict, job["samples"]):
        head, _ = build_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix, True)
        n_context = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        max_new_tokens = sample.max_new_tokens
        if job["max_new_tokens"] is not None:  # the eval's --max-new-tokens cap
            max_new_tokens = min(max_new_tokens, job["max_new_tokens"])
        for name in job["presses"]:
            press = build_press(name, {}, job["budget"], n_context)
            # kvpress puts the context in the user turn and the template's tail after the question;
            # "\n\n" + question gives the same text as our prompt's question part.
            text = pipe(
                sample.context, question="\n\n" + sample.question, answer_prefix=sample.answer_prefix or "",
                press=press, max_new_tokens=max_new_tokens,
            )["answer"]  # fmt: skip
            row = job["want"].get(f"kvpress:{name}|{sample.index}")
            verdict = "missing" if row is None else ("same" if row == text else "DIFFERS")
            verdicts[verdict] += 1
            print(f"{sample.index:3d} {name:18s} gold={sample.answers[0]!r:14s} pipeline={text[:40]!r:44s} "
                  f"eval={None if row is None else row[:40]!r:44s} {verdict}", flush=True)  # fmt: skip
    print(f"same {verdicts['same']}, differ {verdicts['DIFFERS']}, missing {verdicts['missing']}")
    return 1 if verdicts["DIFFERS"] else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--stage-peers":
        return peers(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--presses", nargs="+", default=["expectedattention", "snapkv"])
    parser.add_argument("--n", type=int, default=4, help="first N samples of the task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--predictions", default=str(ROOT / "docs/eval/predictions.jsonl"))
    return ours(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
