"""The vLLM OpenAI server (``vllm serve``) with the plugin on, end to end on loopback: concurrent
requests, exact answers, per-request presses, every block back in the pool, a clean shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import clusterattn as ca
from clusterattn.vllm.spec import parse_press
from conftest import free_port, needle_case, start_server, stop_server

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
    ("clusterattn:budget=256,decode_budget=16", "decode_budget"),
    ("clusterattn:budget=256,interval=64", "interval"),
]
DECODING = "clusterattn:budget=256,decode_budget=128,interval=8"  # re-selects from the first step on


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
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = start_server(str(model_dir), port, log, env={})
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_server(proc)


def test_concurrent_requests_match_the_transformers_path(server, hf_model):
    base, proc = server
    model, tokenizer = hf_model
    cases = [needle_case(tokenizer, 1000 + 40 * i, 30 + i) for i in range(N_REQUESTS)]
    presses = ["clusterattn:budget=256"] * (N_REQUESTS - 3) + [DECODING, "snapkv:budget=128", "none"]

    def ask(i: int) -> dict:
        body = {"model": "smollm2", "prompt": cases[i][2], "max_tokens": MAX_TOKENS, "temperature": 0}
        if i >= N_REQUESTS - 3:  # the last three choose their own press
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
