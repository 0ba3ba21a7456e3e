"""Shared helpers for the vLLM plugin tests (run in .venv-vllm only: ``make test-vllm``).

Engines run in subprocesses (:mod:`run_engine`), each from a clean interpreter with the plugin on
or off; the transformers reference runs in the test process on the same fp32 checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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


def run_engine(
    job: dict, *, press_env: str | None, tmp_path, timeout: int = 900, expect_ok: bool = True, env_extra=None
):
    """Run :mod:`run_engine` on ``job``; returns its JSON result (or the CompletedProcess on failure).
    ``env_extra``: more environment variables for the engine."""
    env = {k: v for k, v in os.environ.items() if k != "CLUSTERATTN_VLLM_PRESS"}
    env.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(env_extra or {})
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, log: pathlib.Path, *, env: dict, max_len: int = 4096):
    """The OpenAI server with the plugin (``CLUSTERATTN_VLLM_PRESS=clusterattn:budget=256``), fp32,
    on loopback, in its own process group; returns once ``/health`` answers. ``env`` adds to or
    overrides the environment (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    full_env.update(
        HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", CLUSTERATTN_VLLM_PRESS="clusterattn:budget=256",
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    full_env.update(env)
    command = [
        # `vllm serve` itself: vllm-cpu's `vllm` script looks up the distribution "vllm" and fails
        # (PackageNotFoundError), so the same server is started through its module.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_len),
        "--max-num-batched-tokens", str(max_len), "--served-model-name", "smollm2", "--seed", "0",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise TimeoutError(f"the server did not become healthy; see {log}") from None
            time.sleep(2)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
