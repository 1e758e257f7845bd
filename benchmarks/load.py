"""Load: many concurrent streaming clients against the demo's network, for a bounded time.

    python -m benchmarks.load --out FILE.json [--streams 256] [--seconds 120] [--max-tokens 16]

Starts the network `make demo` starts (two vLLM nodes of the default model, embedded settlement), on
127.0.0.1 only, then keeps `--streams` streaming chat completions in flight for `--seconds` (each
client starts its next request when the last one ends). Checks that every stream ended with [DONE]
and that every request has exactly one ok usage record; samples the gateway replica's RSS every
second. JSON: streams, requests, errors, incomplete, records_missing, p50/p99 TTFT, tok/s, peak RSS.
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


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def _stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Story {i} about the sea."}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    t0, ttft, done, rid = time.perf_counter(), None, False, None
    try:
        async with client.stream("POST", url, json=body) as resp:
            rid = resp.headers.get("x-meritnet-request-id")
            if resp.status_code != 200:
                return {"ok": False, "error": f"HTTP {resp.status_code}", "rid": rid}
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and ttft is None and '"content"' in line:
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        return {"ok": False, "error": type(exc).__name__, "rid": rid}
    return {
        "ok": done,
        "error": None if done else "incomplete",
        "rid": rid,
        "ttft": ttft,
        "e2e": time.perf_counter() - t0,
    }


async def _load(url: str, streams: int, seconds: float, max_tokens: int) -> list[dict]:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(w: int) -> list[dict]:
            out, i = [], 0
            while time.monotonic() < deadline:
                out.append(await _stream(client, url, w * 100_000 + i, max_tokens))
                i += 1
            return out

        per_worker = await asyncio.gather(*(worker(w) for w in range(streams)))
    return [r for rs in per_worker for r in rs]


def _gateway_rss_mb() -> float:
    """RSS of the gateway replica process (Ray names its process after the actor class)."""
    import psutil

    total = 0.0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "ServeReplica:meritnet:gateway" in cmd and p.info["memory_info"]:
            total += p.info["memory_info"].rss / 2**20
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from deploy.config import NetworkConfig
    from deploy.network import LocalNetwork
    from deploy.usage import USAGE_STORE_NAME

    cfg = NetworkConfig(port=9000 + os.getpid() % 1000, state_dir=Path(f"/tmp/meritnet-load-{os.getpid()}"))
    with console.status("Starting the demo network (two vLLM nodes)..."):
        net = LocalNetwork(cfg).start()
    try:
        import ray

        url = f"{net.base_url}/v1/chat/completions"
        asyncio.run(_load(url, 2, 1.0, args.max_tokens))  # warm up
        peak = {"rss": _gateway_rss_mb()}
        stop = False

        def sample() -> None:
            while not stop:
                peak["rss"] = max(peak["rss"], _gateway_rss_mb())
                time.sleep(1.0)

        import threading

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        console.log(f"{args.streams} streams for {args.seconds:.0f} s ...")
        t0 = time.perf_counter()
        results = asyncio.run(_load(url, args.streams, args.seconds, args.max_tokens))
        wall = time.perf_counter() - t0
        stop = True
        sampler.join()
        time.sleep(2.0)
        records = {r.request_id: r for r in ray.get(ray.get_actor(USAGE_STORE_NAME).all.remote())}
        ok = [r for r in results if r["ok"]]
        ttft = [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
        report = {
            "streams": args.streams,
            "seconds": args.seconds,
            "requests": len(results),
            "errors": sum(1 for r in results if r["error"] not in (None, "incomplete")),
            "incomplete": sum(1 for r in results if r["error"] == "incomplete"),
            "records_missing": sum(
                1 for r in ok if r["rid"] not in records or records[r["rid"]].status != "ok"
            ),
            "p50_ttft_ms": round(statistics.median(ttft), 1) if ttft else None,
            "p99_ttft_ms": round(_pct(ttft, 0.99), 1) if ttft else None,
            "tok_s": round(len(ok) * args.max_tokens / wall, 1),
            "peak_rss_mb": round(peak["rss"], 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        }
    finally:
        net.stop()
    args.out.write_text(json.dumps(report, indent=2))
    console.print_json(json.dumps(report))


if __name__ == "__main__":
    main()
