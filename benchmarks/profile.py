"""Where a request's time goes: py-spy on every process of the request path during a steady load.

    python -m benchmarks.profile --out FILE.json [--concurrency 8] [--seconds 20]

Starts the benchmark network (one node, as `benchmarks.gateway`), drives streaming chat completions
of 32 tokens at the given concurrency, and meanwhile samples (py-spy, 100 Hz, no idle frames) the
Serve proxy, the gateway replica, the node replica (LLMServer) and the vLLM engine core. Per process:
how busy it was (share of one core) and the functions holding it (self time, by file:function). Two
cores are shared by all of them, so a busy Ray process is time the engine does not get.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
from rich.console import Console

from benchmarks.gateway import _round

console = Console(stderr=True)
RATE = 100
TARGETS = {  # role -> what its command line contains
    "proxy": "ProxyActor",
    "gateway": "ServeReplica:meritnet:gateway",
    "node_replica": "ServeReplica:node-h100-a",
    "engine": "EngineCore",
}


def _pids() -> dict[str, int]:
    found: dict[str, int] = {}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        for role, needle in TARGETS.items():
            if needle in text and role not in found:
                found[role] = p.info["pid"]
    return found


def _summarise(raw: str, seconds: float) -> dict:
    """py-spy's raw output ("f1;f2;...;fn count" per line) -> busy share and top self-time frames."""
    self_time: Counter = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        self_time[leaf.split(" (")[0] + " " + leaf.rsplit("/", 1)[-1].rstrip(")")] += n
    return {
        "busy_share_of_one_core": round(total / (RATE * seconds), 3),
        "top_self": {k: round(v / max(total, 1), 3) for k, v in self_time.most_common(12)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from deploy.config import DEMO_OPERATOR_A, NetworkConfig, NodeConfig
    from deploy.network import LocalNetwork

    cfg = NetworkConfig(
        port=8000 + os.getpid() % 1000,
        state_dir=Path(f"/tmp/meritnet-profile-{os.getpid()}"),
        nodes=[NodeConfig(node_id="h100-a", operator=DEMO_OPERATOR_A, accelerator_type="H100")],
    )
    with console.status("Starting a one-node network..."):
        net = LocalNetwork(cfg).start()
    url = f"{net.base_url}/v1/chat/completions"
    out: dict = {}
    try:
        asyncio.run(_round(url, 2, 4, 32))  # warm
        pids = _pids()
        console.log(f"profiling {pids}")
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                asyncio.run(_round(url, args.concurrency, args.concurrency * 2, 32))

        driver = threading.Thread(target=load, daemon=True)
        driver.start()
        time.sleep(3)  # steady state
        tmp = Path(tempfile.mkdtemp(prefix="pyspy-"))
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        procs = {
            role: subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(int(args.seconds)),
                    "-r",
                    str(RATE),
                    "--format",
                    "raw",
                    "-o",
                    str(tmp / f"{role}.txt"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for role, pid in pids.items()
        }
        with console.status(
            f"Sampling {', '.join(procs)} for {args.seconds:.0f} s at c{args.concurrency}..."
        ):
            for p in procs.values():
                p.wait(args.seconds + 60)
        stop.set()
        driver.join(120)
        for role in procs:
            path = tmp / f"{role}.txt"
            out[role] = (
                _summarise(path.read_text(), args.seconds) if path.is_file() else {"error": "no samples"}
            )
    finally:
        net.stop()
    out["setup"] = {
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rate_hz": RATE,
        "cpus": os.cpu_count(),
    }
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps(out))


if __name__ == "__main__":
    main()
