"""The vLLM OpenAI server (``vllm serve``) with the plugin on, end to end on loopback: concurrent
requests, exact answers, per-request presses, every block back in the pool, a clean shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import clusterattn as ca
from clusterattn.vllm.spec import parse_press
from conftest import needle_case

MAX_TOKENS = 24
N_REQUESTS = 6  # bounded: one burst of concurrent requests, then the server stops
BAD_SPECS = [  # specs that once reached the worker and killed the engine, or were silently accepted
    ("clusterattn:budget=256,alpha=nan", "alpha"),
    ("clusterattn:budget=256,n_sink=225", "n_sink"),
    ("h2o:budget=256,chunk_size=0", "chunk_size"),
    ("clusterattn:budget=256,budget=128", "budget"),
    ("clusterattn:budget=\uff12\uff15\uff16", "budget"),
    ("clusterattn:budget=256,theta=nan", "theta"),
    ("clusterattn:budget=256,alpha=inf", "alpha"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _post(url: str, body: dict, timeout: float = 600.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(
        HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", CLUSTERATTN_VLLM_PRESS="clusterattn:budget=256",
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    command = [
        # `vllm serve` itself: vllm-cpu's `vllm` script looks up the distribution "vllm" and fails
        # (PackageNotFoundError), so the same server is started through its module.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "4096", "--max-num-batched-tokens", "4096", "--served-model-name", "smollm2",
        "--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--seed", "0",
    ]  # fmt: skip
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if _get(base + "/health") == "":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not become healthy; see {log.name}")
            time.sleep(2)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_concurrent_requests_match_the_transformers_path(server, hf_model):
    base, proc = server
    model, tokenizer = hf_model
    cases = [needle_case(tokenizer, 1000 + 40 * i, 30 + i) for i in range(N_REQUESTS)]
    presses = ["clusterattn:budget=256"] * (N_REQUESTS - 2) + ["snapkv:budget=128", "none"]

    def ask(i: int) -> dict:
        body = {"model": "smollm2", "prompt": cases[i][2], "max_tokens": MAX_TOKENS, "temperature": 0}
        if i >= N_REQUESTS - 2:  # the last two choose their own press
            body["vllm_xargs"] = {"clusterattn_press": presses[i]}
        return _post(base + "/v1/completions", body)

    with ThreadPoolExecutor(N_REQUESTS) as pool:
        replies = list(pool.map(ask, range(N_REQUESTS)))
    for (context, question, _), spec, reply in zip(cases, presses, replies, strict=True):
        ref = ca.generate(
            model, tokenizer, context, question, press=parse_press(spec), max_new_tokens=MAX_TOKENS
        )
        assert reply["choices"][0]["text"] == tokenizer.decode(ref.tokens[0], skip_special_tokens=True)
    value = re.search(r"\d{7}", cases[0][0]).group()
    assert value in replies[0]["choices"][0]["text"]  # and the answer is right

    bad = {
        "model": "smollm2",
        "prompt": "hi",
        "max_tokens": 2,
        "vllm_xargs": {"clusterattn_press": "quest:budget=9"},
    }
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(base + "/v1/completions", bad)
    assert err.value.code == 400 and "unknown press" in err.value.read().decode()
    for spec, field in BAD_SPECS:  # refused on arrival, naming the field; the server lives on
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(base + "/v1/completions", {**bad, "vllm_xargs": {"clusterattn_press": spec}})
        assert err.value.code == 400 and field in err.value.read().decode(), spec

    metrics = _get(base + "/metrics")
    usage = [line for line in metrics.splitlines() if line.startswith("vllm:kv_cache_usage_perc")]
    assert usage and all(float(line.split()[-1]) == 0.0 for line in usage)  # no block leaked
    assert proc.poll() is None


def test_server_stops_cleanly(server):
    _, proc = server
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 60  # the engine core and its helpers exit shortly after
    while True:
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert left == []
