"""Router decision latency with the default profile at 8, 64 and 1000 candidate nodes.

    python -m benchmarks.router --out FILE.json [--quick]

Measures `Router.route(facts)` (columns lookup + the full organic profile: filters, weighted
scorers, picker, per-plugin timing), the call the gateway makes per request, on a realistic
fleet: mixed accelerators and loads, 10% unscored, 5% below the quality floor, 5% banned,
5% not live, latency EWMAs set, a varying session/prefix key. Between decisions one node's
in-flight count changes (begin/end), as under real traffic, so the in-flight column and its
version change as often as they would. Output: {"nodes": {"8": {"p50_us", "p99_us", "mean_us",
"cpu_p50_us", "cpu_p99_us"}, ...} (wall clock; cpu_* = this thread's CPU time, which excludes
time the OS gave other processes on a busy machine),
"plugins_mean_us": {...}, "machine": ...}. `--quick` runs fewer decisions (same keys).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from eth_utils import to_checksum_address
from rich.progress import track

from cluster.records import NodeStats
from routing.router import RequestFacts, Router

SIZES = (8, 64, 1000)
OPERATOR = to_checksum_address("0x" + "11" * 20)


def build_router(n: int, seed: int = 0) -> Router:
    rng = random.Random(seed)
    now = 1_000_000.0
    router = Router.from_yaml(clock=lambda: now, rng=random.Random(seed))
    accels = [("L4", 8), ("A100", 16), ("H100", 32)]
    stats = []
    for i in range(n):
        accel, cap = accels[i % 3]
        stats.append(
            NodeStats(
                node_id=f"node-{i}",
                model_id="default",
                operator=OPERATOR,
                accelerator_type=accel,
                capacity=cap,
                live=rng.random() > 0.05,
                running_replicas=1,
                in_flight=0,
                joined_at=now - 3600,
            )
        )
    router.update_nodes(stats)
    quality = {}
    for i in range(n):
        u = rng.random()
        if u < 0.10:
            continue  # unscored: probation
        quality[f"node-{i}"] = rng.uniform(0.1, 0.45) if u < 0.15 else rng.uniform(0.6, 1.0)
    router.update_quality(quality)
    for i in range(n):
        nid = f"node-{i}"
        speed = (1.0, 3.0, 10.0)[i % 3]
        router.observe_success(nid, 0.2 / speed, 0.05 / speed)
        for _ in range(rng.randrange(0, stats[i].capacity)):
            router.begin(nid)
        if rng.random() < 0.05:
            router.observe_failure(nid, now)
    return router


def measure(n: int, decisions: int, seed: int = 0) -> dict:
    router = build_router(n, seed)
    rng = random.Random(seed + 1)
    ids = [f"node-{i}" for i in range(n)]
    keys = [f"{k:016x}" for k in range(256)]
    facts = [
        RequestFacts(
            "default", 200, keys[rng.randrange(256)], f"s{rng.randrange(64)}" if rng.random() < 0.3 else None
        )
        for _ in range(1024)
    ]
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    samples, cpu_samples = [], []
    for i in range(decisions + 200):
        nid = ids[i % n]
        router.begin(nid)
        router.end(nid)
        f = facts[i & 1023]
        c0, t0 = cpu(), clock()
        router.route(f)
        dt, dc = clock() - t0, cpu() - c0
        if i >= 200:  # warm-up
            samples.append(dt / 1000)
            cpu_samples.append(dc / 1000)
    samples.sort()
    cpu_samples.sort()
    return {
        "p50_us": round(samples[len(samples) // 2], 2),
        "p99_us": round(samples[int(len(samples) * 0.99)], 2),
        "mean_us": round(statistics.fmean(samples), 2),
        # CPU time of this thread: what the decision costs when the 2 cores are shared with other work.
        "cpu_p50_us": round(cpu_samples[len(cpu_samples) // 2], 2),
        "cpu_p99_us": round(cpu_samples[int(len(cpu_samples) * 0.99)], 2),
        "decisions": decisions,
        "plugins_mean_us": {k: round(v, 2) for k, v in router.timings.mean_us().items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--quick", action="store_true", help="fewer decisions (same keys)")
    args = ap.parse_args()
    per_size = {8: 20_000, 64: 20_000, 1000: 3_000} if args.quick else {8: 200_000, 64: 100_000, 1000: 20_000}
    result: dict = {"nodes": {}, "plugins_mean_us": {}}
    for n in track(SIZES, description="router decisions"):
        r = measure(n, per_size[n])
        result["plugins_mean_us"][str(n)] = r.pop("plugins_mean_us")
        result["nodes"][str(n)] = r
    result["quick"] = args.quick
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["nodes"], indent=2))


if __name__ == "__main__":
    main()
