"""Gateway latency vs bare vLLM and stock ray.serve.llm, measured in one run on the same model and machine.

    python -m benchmarks.gateway --out FILE.json [--quick]

Three stacks, each with one vLLM engine of the default model and the same engine arguments and
environment (bf16, eager, max_model_len 1024, max_num_seqs 8, one OpenMP thread):
  meritnet: Serve ingress -> meritnet gateway -> LLMServer (stream batching off)
  stock:    Serve ingress -> ray.serve.llm OpenAiIngress (build_openai_app) -> LLMServer (defaults)
  (both Ray stacks share one Serve instance, so one ingress: HAProxy unless RAY_SERVE_ENABLE_HA_PROXY=0,
  cluster/local.py)
  bare:     vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), outside Ray
Requests are streaming chat completions with a fixed output length (ignore_eos, greedy), so every
stack generates the same tokens; rounds rotate the order of the stacks so machine noise hits all alike.
TTFT = time to the first content chunk at the client; e2e = time to the end of the stream; itl = the gap
between consecutive content chunks of one stream (clumped tokens show as a few long gaps).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console

console = Console(stderr=True)
STOCK_PREFIX = "/stock"
# httpx logs every request at INFO (Ray's driver logging shows them): the load client would spend CPU on
# a log line per request, CPU the stacks under test share with it.
logging.getLogger("httpx").setLevel(logging.WARNING)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int
) -> tuple[float, float, int, list[float]]:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    gaps: list[float] = []
    last = None
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            for choice in payload.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    chunks += 1
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, chunks, gaps


async def _round(url: str, concurrency: int, n: int, max_tokens: int) -> tuple[list, float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def run(i):
            async with sem:
                return await _one(client, url, f"Request {i}: tell me a story about the sea.", max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n)))
        return results, time.perf_counter() - t0


def _summary(results: list, wall_s: float, max_tokens: int) -> dict:
    ttft = [r[0] * 1000 for r in results]
    e2e = [r[1] * 1000 for r in results]
    itl = [g * 1000 for r in results for g in r[3]] or [float("nan")]
    return {
        "ttft_p50_ms": round(statistics.median(ttft), 2),
        "ttft_p99_ms": round(_pct(ttft, 0.99), 2),
        "e2e_p50_ms": round(statistics.median(e2e), 2),
        "e2e_p99_ms": round(_pct(e2e, 0.99), 2),
        "itl_p50_ms": round(statistics.median(itl), 2),
        "itl_p90_ms": round(_pct(itl, 0.90), 2),
        "itl_p99_ms": round(_pct(itl, 0.99), 2),
        "tok_s": round(len(results) * max_tokens / wall_s, 1),
        "requests": len(results),
    }


def _deploy_stock(model_path: str, engine_kwargs: dict) -> None:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    cfg = LLMConfig(
        model_loading_config={"model_id": "default", "model_source": model_path},
        engine_kwargs={**ENGINE_ARGS, **engine_kwargs},
        placement_group_config={"bundles": [{"CPU": 1, "accel_L4": 0.01}], "strategy": "STRICT_PACK"},
        deployment_config={"num_replicas": 1},
    )
    serve.run(build_openai_app({"llm_configs": [cfg]}), name="stock", route_prefix=STOCK_PREFIX)


ENGINE_ARGS = {"max_model_len": 1024, "max_num_seqs": 8}


def _start_bare(model_path: str, engine_kwargs: dict, env: dict, port: int) -> subprocess.Popen:
    """vLLM's own OpenAI server on 127.0.0.1:port with the same engine arguments and environment."""
    flags = {**ENGINE_ARGS, **engine_kwargs}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    cmd += ["--served-model-name", "default", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in flags.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):  # vLLM's boolean flags take --no-<flag> for False
            cmd.append(f"--{name}" if value else f"--no-{name}")
        else:  # a dict (structured_outputs_config) or list as JSON, as vLLM's CLI parses it
            cmd += [f"--{name}", json.dumps(value) if isinstance(value, dict | list) else str(value)]
    log = open(f"/tmp/meritnet-bench-bare-{port}.log", "w")
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bare vLLM exited with {proc.returncode}; see /tmp/meritnet-bench-bare-*.log")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("bare vLLM did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer requests, same keys")
    ap.add_argument(
        "--linger-ms",
        type=float,
        default=None,
        help="meritnet nodes' stream_linger_ms (default: the engine default)",
    )
    ap.add_argument(
        "--stock-direct-streaming",
        action="store_true",
        help="stock ray.serve.llm with Ray's direct streaming (RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1: "
        "the ingress hands the request to the LLMServer replica, which streams vLLM's own OpenAI app "
        "through HAProxy); Ray's fastest path, as a reference",
    )
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.stock_direct_streaming:  # before Ray starts: its processes read it at import
        os.environ["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] = "1"
    from cluster.local import use_serve_fast_path

    use_serve_fast_path()  # before Serve is imported here: its builders read the ingress settings at import

    from deploy.config import DEMO_OPERATOR_A, NetworkConfig, NodeConfig
    from deploy.network import LocalNetwork

    max_tokens = 32
    plan = {
        "c1": (1, 12 if args.quick else 40),
        "c8": (8, 32 if args.quick else 96),
        "c32": (32, 64 if args.quick else 128),
    }
    rounds = 2 if args.quick else 4
    cfg = NetworkConfig(
        port=8000 + os.getpid() % 1000,
        state_dir=Path(f"/tmp/meritnet-bench-{os.getpid()}"),
        nodes=[NodeConfig(node_id="h100-a", operator=DEMO_OPERATOR_A, accelerator_type="H100")],
    )
    # The stock stack's engine gets its own Ray node (L4), as meritnet's node has H100.
    cfg.cluster = cfg.cluster.model_copy(update={"extra_accelerator_types": ["L4"]})
    if args.linger_ms is not None:
        cfg.engine = cfg.engine.model_copy(update={"stream_linger_ms": args.linger_ms})
    bare_port = cfg.port + 1
    with console.status("Starting meritnet, stock ray.serve.llm and bare vLLM (one engine each)..."):
        net = LocalNetwork(cfg).start()
        _deploy_stock(net.specs[0].model_source, cfg.engine.engine_kwargs)
        bare = _start_bare(
            net.specs[0].model_source,
            {**cfg.engine.engine_kwargs, **cfg.engine.serving_kwargs},
            cfg.cluster.env_vars,
            bare_port,
        )
        _wait_http(f"http://127.0.0.1:{bare_port}/health", bare)
    try:
        urls = {
            "meritnet": f"{net.base_url}/v1/chat/completions",
            "ray_serve_llm": f"{net.base_url}{STOCK_PREFIX}/v1/chat/completions",
            "bare_vllm": f"http://127.0.0.1:{bare_port}/v1/chat/completions",
        }
        for url in urls.values():  # warm both paths
            asyncio.run(_round(url, 2, 4, max_tokens))
        out: dict = {name: {} for name in urls}
        samples: dict = {}  # every TTFT and inter-token gap, for benchmarks/plot_gateway.py
        for level, (conc, n) in plan.items():
            acc = {name: ([], 0.0) for name in urls}
            for r in range(rounds):
                items = list(urls.items())
                order = items[r % len(items) :] + items[: r % len(items)]  # rotate who goes first
                for name, url in order:
                    console.log(f"{level} round {r + 1}/{rounds}: {name}")
                    res, wall = asyncio.run(_round(url, conc, n // rounds, max_tokens))
                    acc[name] = (acc[name][0] + res, acc[name][1] + wall)
            for name, (res, wall) in acc.items():
                out[name][level] = _summary(res, wall, max_tokens)
                samples.setdefault(name, {})[level] = {
                    "ttft_ms": [round(r[0] * 1000, 2) for r in res],
                    "itl_ms": [round(g * 1000, 2) for r in res for g in r[3]],
                }
        m, s, b = out["meritnet"], out["ray_serve_llm"], out["bare_vllm"]
        out["ratio"] = {
            f"{lv}_{k}": round(m[lv][f"{k}_ms"] / s[lv][f"{k}_ms"], 3)
            for lv in ("c1", "c8")
            for k in ("ttft_p50", "e2e_p50")
        }
        out["ratio_vs_bare"] = {
            "c1_ttft_p50": round(m["c1"]["ttft_p50_ms"] / b["c1"]["ttft_p50_ms"], 3),
            "c8_ttft_p50": round(m["c8"]["ttft_p50_ms"] / b["c8"]["ttft_p50_ms"], 3),
            "c1_e2e_p50": round(m["c1"]["e2e_p50_ms"] / b["c1"]["e2e_p50_ms"], 3),
            "c8_e2e_p50": round(m["c8"]["e2e_p50_ms"] / b["c8"]["e2e_p50_ms"], 3),
            "c1_itl_p90": round(m["c1"]["itl_p90_ms"] / b["c1"]["itl_p90_ms"], 3),
            "c32_tok_s": round(m["c32"]["tok_s"] / b["c32"]["tok_s"], 3),
        }
        out["machine"] = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "quick": args.quick,
            "max_tokens": max_tokens,
            "stream_linger_ms": cfg.engine.stream_linger_ms,
            "stock_direct_streaming": args.stock_direct_streaming,
            "ha_proxy": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY"),
        }
    finally:
        bare.terminate()
        try:
            bare.wait(30)
        except subprocess.TimeoutExpired:
            bare.kill()
        net.stop()
    out["samples"] = samples
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps({k: v for k, v in out.items() if k != "samples"}))


if __name__ == "__main__":
    main()
