"""What each way of reaching a node costs: Serve handle, direct HTTP to the replica, open node over HTTP.

    python -m benchmarks.node_hop --out FILE.json [--requests 200] [--concurrency 32]

One Ray instance, one instant fake node (a Serve deployment that answers like LLMServer, as text,
with no engine behind it, so only the transport is timed), reached both ways from the same process
through the node interface the gateway uses (cluster/nodes.py):
  managed: ServeNode -> Serve handle -> the node's replica
  direct:  HttpNode -> the replica's own HTTP server (cluster/node_http.py DirectServer, the link its
           `http_link` hands out), as the gateway reaches a managed node now
  open:    HttpNode (httpx keep-alive pool, the node's secret) -> Serve HTTP proxy -> node ingress
           (cluster/node_http.py: secret check, vLLM request model) -> Serve handle -> the node's replica
Rounds alternate between the paths so machine noise hits all alike. first = time to the first message;
total = time to the end of a 16-chunk stream. Ratios are over the Serve handle path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from cluster.records import NodeLink

console = Console(stderr=True)
CHUNKS = 16
NODE_APP = "node-fake"


def _fake_node():
    from ray import serve

    def chunk(i: int) -> str:
        choice = {
            "index": 0,
            "text": f"t{i} ",
            "token_ids": [i],
            "finish_reason": "stop" if i == CHUNKS - 1 else None,
        }
        return "data: " + json.dumps({"id": "x", "object": "text_completion", "choices": [choice]}) + "\n\n"

    @serve.deployment(name=NODE_APP, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    class FakeNode:
        def __init__(self) -> None:
            self._direct = None

        async def completions(self, body, raw=None):
            for i in range(CHUNKS):
                yield [chunk(i)]
            yield ["data: [DONE]\n\n"]

        async def http_link(self):  # as NodeServer's (cluster/deployment.py)
            from cluster.node_http import DirectServer

            async def start(method, body):
                return self.completions(body)

            if self._direct is None:
                self._direct = await DirectServer.start("127.0.0.1", "default", start)
            return self._direct.link

    return FakeNode.bind()


async def _one(node, body) -> tuple[float, float]:
    t0 = time.perf_counter()
    stream = node.call("completions", body)
    first = None
    async for _ in stream:
        first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0


async def _round(node, body, requests: int, concurrency: int) -> list[tuple[float, float]]:
    gate = asyncio.Semaphore(concurrency)

    async def go():
        async with gate:
            return await _one(node, body)

    return await asyncio.gather(*(go() for _ in range(requests)))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(results: list[tuple[float, float]]) -> dict:
    first = [r[0] * 1000 for r in results]
    total = [r[1] * 1000 for r in results]
    return {
        "requests": len(results),
        "first_ms_p50": round(statistics.median(first), 2),
        "first_ms_p99": round(_pct(first, 0.99), 2),
        "total_ms_p50": round(statistics.median(total), 2),
        "total_ms_p99": round(_pct(total, 0.99), 2),
    }


async def _measure(paths: dict, body, requests: int, concurrency: int, rounds: int) -> dict:
    out: dict = {}
    for level in (1, concurrency):
        got: dict[str, list] = {name: [] for name in paths}
        for node in paths.values():
            await _round(node, body, 10, level)  # warm every path
        for _ in range(rounds):
            for name, node in paths.items():
                got[name] += await _round(node, body, requests // rounds, level)
        summary = {name: _summary(results) for name, results in got.items()}
        base = summary["managed"]
        out[f"concurrency_{level}"] = {
            **summary,
            **{
                f"ratio_{name}_over_managed": {
                    k: round(summary[name][k] / base[k], 2)
                    for k in ("first_ms_p50", "total_ms_p50", "total_ms_p99")
                }
                for name in paths
                if name != "managed"
            },
            "added_ms_p50": {
                name: round(summary[name]["total_ms_p50"] - base["total_ms_p50"], 2)
                for name in paths
                if name != "managed"
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve
    from ray.serve.llm.openai_api_models import CompletionRequest

    from cluster.node_http import INGRESS_NAME, node_ingress_app
    from cluster.nodes import HttpNode, ServeNode
    from tests.support.ports import free_port

    state = Path(tempfile.mkdtemp(prefix="hop-"))
    (state / "secret").write_text("bench-secret")
    port = free_port()
    with console.status("Starting Ray and the fake node (handle and HTTP ingress)..."):
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(_fake_node(), name=NODE_APP, route_prefix=None)
        serve.run(
            node_ingress_app("default", NODE_APP, state / "secret"), name=INGRESS_NAME, route_prefix="/"
        )
    body = CompletionRequest(model="default", prompt="hello", max_tokens=CHUNKS, stream=True)

    async def run() -> dict:
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=1024)
        )
        handle = serve.get_deployment_handle(NODE_APP, app_name=NODE_APP)
        paths = {
            "managed": ServeNode(handle),
            "direct": HttpNode(await handle.http_link.remote(), http),
            "open": HttpNode(NodeLink(f"http://127.0.0.1:{port}", "bench-secret"), http),
        }
        with console.status(
            f"Timing {args.requests} requests per path at concurrency 1 and {args.concurrency}..."
        ):
            return await _measure(paths, body, args.requests, args.concurrency, args.rounds)

    try:
        out = asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()
    out["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    out["command"] = (
        f"python -m benchmarks.node_hop --requests {args.requests} --concurrency {args.concurrency}"
    )
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps(out))


if __name__ == "__main__":
    main()
