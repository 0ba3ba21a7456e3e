"""A bounded soak of the vLLM OpenAI server with the plugin (loopback only; stops by itself).

Phases, each a fixed number of requests: a warm-up wave that fills the KV pool (the RSS baseline
is taken after it), mixed presses at concurrency 24, streaming clients that disconnect after the
first chunk, over-long prompts, bad press specs, and a preemption wave of long answers in a small
KV space at concurrency 32. Before and after, the server answers one fixed prompt; afterwards it
must answer it token-identically, with KV usage back to 0, at least one preemption, and the
server's RSS grown by at most ``--rss-bound-mb``. Writes a JSON record and a Markdown table
(requests sent / succeeded / clear 4xx / 5xx / lost per phase).

    make serving-soak        # .venv-vllm/bin/python benchmarks/serving_soak.py --out docs/serving-soak
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests_vllm"))
PRESSES = [
    "clusterattn:budget=256", "clusterattn:budget=128,recent_ratio=0.5", "snapkv:budget=128",
    "chunkkv:budget=256", "streamingllm:budget=256", "h2o:budget=192", "none", None,
]  # fmt: skip
BAD = [
    "clusterattn:budget=256,alpha=nan", "clusterattn:budget=256,n_sink=225", "h2o:budget=256,chunk_size=0",
    "clusterattn:budget=256,budget=128", "clusterattn:budget=\uff12\uff15\uff16",
    "clusterattn:budget=256,theta=nan",
    "clusterattn:budget=256,alpha=inf", "quest:budget=64", "pyramidkv:budget=256", "clusterattn:budget=8",
]  # fmt: skip


def post(base: str, body: dict, timeout: float = 900.0) -> tuple[int, dict | str]:
    request = urllib.request.Request(
        base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def disconnect_after_first_chunk(port: int, body: dict) -> tuple[int, str]:
    """A streaming request whose client goes away after the first chunk of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    status = response.status
    first = response.readline().decode(errors="replace")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client is gone mid-stream
    conn.close()
    return status, first


def metric(base: str, name: str) -> float:
    """The sum over labels of Prometheus metric ``name`` (exactly that name)."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


def server_rss(proc: subprocess.Popen) -> int:
    """Resident bytes of the server and every process it started (the engine core)."""
    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())


SERVER: dict = {}  # the server process, once started (run_phase records its RSS after each phase)


def run_phase(name: str, jobs: list, concurrency: int) -> dict:
    """``jobs``: callables returning ``(status, reply)``; counts by outcome."""
    counts = {"phase": name, "sent": len(jobs), "ok": 0, "4xx": 0, "5xx": 0, "lost": 0, "errors": []}
    started = time.monotonic()

    def one(job):
        try:
            return job()
        except Exception as err:  # noqa: BLE001 (a lost request is counted, not raised)
            return None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(concurrency) as pool:
        for status, reply in pool.map(one, jobs):
            if status is None:
                counts["lost"] += 1
                counts["errors"].append(reply)
            elif 200 <= status < 300:
                counts["ok"] += 1
            elif 400 <= status < 500:
                counts["4xx"] += 1
            else:
                counts["5xx"] += 1
                counts["errors"].append(str(reply)[:300])
    counts["seconds"] = round(time.monotonic() - started, 1)
    proc = SERVER.get("proc")
    counts["rss_mb_after"] = None if proc is None else round(server_rss(proc) / 2**20)
    counts["errors"] = counts["errors"][:5]
    print(json.dumps(counts), flush=True)
    return counts


def main(argv=None) -> None:
    from conftest import free_port, haystack, start_server, stop_server  # tests_vllm's helpers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for soak.json and soak.md")
    parser.add_argument("--requests", type=int, default=200, help="requests of the mixed-press phase (200)")
    parser.add_argument("--kv-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE in GiB (default 1)")
    parser.add_argument("--rss-bound-mb", type=float, default=400.0, help="allowed RSS growth (400 MB)")
    parser.add_argument("--seed", type=int, default=0, help="prompt and press draws (default 0)")
    parser.add_argument(
        "--mmap-threshold", type=int, default=131072,
        help="MALLOC_MMAP_THRESHOLD_ of the server's processes, so that RSS measures live memory "
        "(default 131072, glibc's starting value; 0: the environment's setting)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from clusterattn.models import converted_dir, load_model

    if not (converted_dir("smollm2-135m") / "config.json").is_file():
        load_model("smollm2-135m")
    rng = random.Random(args.seed)
    port, max_len = free_port(), 4096
    base = f"http://127.0.0.1:{port}"
    env = {"VLLM_CPU_KVCACHE_SPACE": args.kv_gib}
    if args.mmap_threshold:  # freed large blocks go back to the system: RSS tracks live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = start_server(
        str(converted_dir("smollm2-135m")), port, args.out / "server.log", env=env, max_len=max_len
    )
    SERVER["proc"] = proc
    fixed = {"model": "smollm2", "prompt": haystack(900, 7, "The code word is: tangerine."), "max_tokens": 32,
             "temperature": 0}  # fmt: skip

    def body(words: int, spec, max_tokens: int) -> dict:
        request = {"model": "smollm2", "prompt": haystack(words, rng.randrange(10**6), "The key is: 4417."),
                   "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
        if spec is not None:
            request["vllm_xargs"] = {"clusterattn_press": spec}
        return request

    try:
        status, before = post(base, fixed)
        assert status == 200, before
        phases = []
        # a first wave touches the whole KV pool (its pages are resident from then on): the RSS bound
        # is measured from after it, so it counts growth, not the pool's first use
        warm = [body(rng.randrange(2000, 2600), "none", 32) for _ in range(16)]
        phases.append(run_phase("warm-up (fills the KV pool)", [lambda b=b: post(base, b) for b in warm], 16))
        rss_before, kv_before = server_rss(proc), metric(base, "vllm:kv_cache_usage_perc")
        preempted_before = metric(base, "vllm:num_preemptions_total")
        mixed = [
            body(rng.randrange(300, 2400), rng.choice(PRESSES), rng.randrange(8, 48))
            for _ in range(args.requests)
        ]
        phases.append(run_phase("mixed presses", [lambda b=b: post(base, b) for b in mixed], 24))
        streams = [body(rng.randrange(500, 2000), rng.choice(PRESSES), 64) for _ in range(30)]
        phases.append(
            run_phase(
                "disconnect mid-stream",
                [lambda b=b: disconnect_after_first_chunk(port, b) for b in streams],
                16,
            )
        )
        long = [body(6000, rng.choice(PRESSES), 8) for _ in range(10)]  # past --max-model-len 4096
        phases.append(run_phase("over-long prompts", [lambda b=b: post(base, b) for b in long], 10))
        bad = [body(300, spec, 8) for spec in BAD * 2]
        phases.append(run_phase("bad press specs", [lambda b=b: post(base, b) for b in bad], 20))
        # long answers: running requests outgrow the pool and are preempted (then prefilled again)
        wave = [body(rng.randrange(2000, 2600), rng.choice(["none", None]), 400) for _ in range(40)]
        phases.append(
            run_phase("preemption wave (uncompressed)", [lambda b=b: post(base, b) for b in wave], 32)
        )
        time.sleep(5)  # disconnected requests are aborted by the server asynchronously
        status, after = post(base, fixed)
        same = status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
        result = {
            "command": sys.argv, "phases": phases, "fixed_prompt_identical": same,
            "kv_usage_before": kv_before, "kv_usage_after": metric(base, "vllm:kv_cache_usage_perc"),
            "preemptions": metric(base, "vllm:num_preemptions_total") - preempted_before,
            "rss_before_mb": rss_before / 2**20, "rss_after_mb": server_rss(proc) / 2**20,
            "rss_bound_mb": args.rss_bound_mb, "alive": proc.poll() is None,
            "malloc_mmap_threshold": args.mmap_threshold or "environment",
        }  # fmt: skip
    finally:
        stop_server(proc)
    result["rss_growth_mb"] = result["rss_after_mb"] - result["rss_before_mb"]
    result["passed"] = (
        result["fixed_prompt_identical"] and result["alive"] and result["kv_usage_after"] == 0.0
        and result["rss_growth_mb"] <= args.rss_bound_mb
        and all(p["5xx"] == 0 and p["lost"] == 0 for p in phases)
        and phases[4]["4xx"] == phases[4]["sent"] and phases[3]["4xx"] == phases[3]["sent"]
        and result["preemptions"] > 0
    )  # fmt: skip
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "| phase | sent | succeeded | clear 4xx | 5xx | lost | seconds | server RSS after, MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['phase']} | {p['sent']} | {p['ok']} | {p['4xx']} | {p['5xx']} | {p['lost']} | {p['seconds']} "
        f"| {p['rss_mb_after']} |"
        for p in phases
    ]
    lines += [
        "", f"Fixed prompt answered identically after the soak: {result['fixed_prompt_identical']}; "
        f"KV usage {result['kv_usage_before']:.3f} before, {result['kv_usage_after']:.3f} after; "
        f"{result['preemptions']:.0f} preemptions; server RSS {result['rss_before_mb']:.0f} MB before, "
        f"{result['rss_after_mb']:.0f} MB after (growth {result['rss_growth_mb']:.0f} MB, "
        f"bound {args.rss_bound_mb:.0f} MB); "
        f"server alive at the end: {result['alive']}. Verdict: {'PASS' if result['passed'] else 'FAIL'}.",
    ]  # fmt: skip
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
