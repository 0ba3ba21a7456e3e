"""Shared helpers for the vLLM plugin tests (run in .venv-vllm only: ``make test-vllm``).

Engines run in subprocesses (:mod:`run_engine`), each from a clean interpreter with the plugin on
or off; the transformers reference runs in the test process on the same fp32 checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
HERE = pathlib.Path(__file__).parent
_FILLER = (
    "the river carried old boats past quiet towns while farmers argued about rain and prices and "
    "children counted birds on the wires above the road where a baker sold bread to travellers who "
    "spoke of mountains cities markets letters songs winters harbours lamps bridges gardens clocks"
)
WORDS = _FILLER.split()


@pytest.fixture(scope="session")
def model_dir() -> pathlib.Path:
    """The fp32 SmolLM2 folder, converted from the PyPI GGUF on first use (no network)."""
    from clusterattn.models import converted_dir, load_model

    folder = converted_dir("smollm2-135m")
    if not (folder / "config.json").is_file():
        load_model("smollm2-135m")
    return folder


@pytest.fixture(scope="session")
def hf_model(model_dir):
    import clusterattn as ca

    return ca.load_model(str(model_dir))


def haystack(n_words: int, seed: int, needle: str) -> str:
    """A deterministic filler text of ``n_words`` words with ``needle`` a third of the way in."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    cut = n_words // 3
    return " ".join(words[:cut]) + f". {needle} " + " ".join(words[cut:]) + "."


def needle_case(tokenizer, n_words: int, seed: int) -> tuple[str, str, list[int]]:
    """(context, question, prompt token ids as :func:`clusterattn.generate` builds them)."""
    from clusterattn.generation import build_prompt

    value = 1000003 + 7919 * seed
    context = haystack(n_words, seed, f"The special magic number for lamp-{seed} is: {value}.")
    question = f"What is the special magic number for lamp-{seed}? Answer with the number only."
    head, tail = build_prompt(tokenizer, context, question)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return context, question, encode(head) + encode(tail)


def run_engine(job: dict, *, press_env: str | None, tmp_path, timeout: int = 900, expect_ok: bool = True):
    """Run :mod:`run_engine` on ``job``; returns its JSON result (or the CompletedProcess on failure)."""
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERATTN_VLLM_PRESS"}
    env.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if press_env is not None:
        env["CLUSTERATTN_VLLM_PRESS"] = press_env
    path = tmp_path / f"job-{abs(hash(json.dumps(job, sort_keys=True)))}.json"
    path.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, str(HERE / "run_engine.py"), str(path), str(path) + ".out"],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    if not expect_ok:
        return done
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(pathlib.Path(str(path) + ".out").read_text())
