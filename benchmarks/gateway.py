"""Gateway latency vs stock ray.serve.llm, measured in one run on the same model and machine.

    python -m benchmarks.gateway --out FILE.json [--quick]

Both stacks run in the same Ray cluster, each with one vLLM engine of the default model:
  meritnet: Serve proxy -> meritnet gateway -> LLMServer (stream batching off)
  stock:    Serve proxy -> ray.serve.llm OpenAiIngress (build_openai_app) -> LLMServer (defaults)
Requests are streaming chat completions with a fixed output length (ignore_eos), so both stacks
generate the same tokens; rounds alternate between the stacks so machine noise hits both alike.
TTFT = time to the first content chunk at the client; e2e = time to the end of the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import httpx
from rich.console import Console

console = Console(stderr=True)
STOCK_PREFIX = "/stock"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
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
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            for choice in payload.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, chunks


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
    return {
        "ttft_p50_ms": round(statistics.median(ttft), 2),
        "ttft_p99_ms": round(_pct(ttft, 0.99), 2),
        "e2e_p50_ms": round(statistics.median(e2e), 2),
        "e2e_p99_ms": round(_pct(e2e, 0.99), 2),
        "tok_s": round(len(results) * max_tokens / wall_s, 1),
        "requests": len(results),
    }


def _deploy_stock(model_path: str, engine_kwargs: dict) -> None:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    cfg = LLMConfig(
        model_loading_config={"model_id": "default", "model_source": model_path},
        engine_kwargs={"max_model_len": 1024, "max_num_seqs": 8, **engine_kwargs},
        placement_group_config={"bundles": [{"CPU": 1, "accel_L4": 0.01}], "strategy": "STRICT_PACK"},
        deployment_config={"num_replicas": 1},
    )
    serve.run(build_openai_app({"llm_configs": [cfg]}), name="stock", route_prefix=STOCK_PREFIX)


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
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from deploy.config import DEMO_OPERATOR_A, NetworkConfig, NodeConfig
    from deploy.network import LocalNetwork

    max_tokens = 32
    plan = {"c1": (1, 12 if args.quick else 40), "c8": (8, 32 if args.quick else 96)}
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
    with console.status("Starting meritnet and stock ray.serve.llm (one engine each)..."):
        net = LocalNetwork(cfg).start()
        _deploy_stock(net.specs[0].model_source, cfg.engine.engine_kwargs)
    try:
        urls = {
            "meritnet": f"{net.base_url}/v1/chat/completions",
            "ray_serve_llm": f"{net.base_url}{STOCK_PREFIX}/v1/chat/completions",
        }
        for url in urls.values():  # warm both paths
            asyncio.run(_round(url, 2, 4, max_tokens))
        out: dict = {name: {} for name in urls}
        for level, (conc, n) in plan.items():
            acc = {name: ([], 0.0) for name in urls}
            for r in range(rounds):
                order = list(urls.items()) if r % 2 == 0 else list(reversed(urls.items()))
                for name, url in order:
                    console.log(f"{level} round {r + 1}/{rounds}: {name}")
                    res, wall = asyncio.run(_round(url, conc, n // rounds, max_tokens))
                    acc[name] = (acc[name][0] + res, acc[name][1] + wall)
            for name, (res, wall) in acc.items():
                out[name][level] = _summary(res, wall, max_tokens)
        m, s = out["meritnet"], out["ray_serve_llm"]
        out["ratio"] = {
            f"{lv}_{k}": round(m[lv][f"{k}_ms"] / s[lv][f"{k}_ms"], 3)
            for lv in plan
            for k in ("ttft_p50", "e2e_p50")
        }
        out["machine"] = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "quick": args.quick,
            "max_tokens": max_tokens,
            "stream_linger_ms": cfg.engine.stream_linger_ms,
        }
    finally:
        net.stop()
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps(out))


if __name__ == "__main__":
    main()
