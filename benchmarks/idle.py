"""CPU the demo network burns with no traffic at all: the cost of just being up.

    python -m benchmarks.idle --out FILE.json [--settle 60] [--window 60]

Starts the network `make demo` starts (embedded defaults), waits `--settle` seconds for start-up work
to end, then sums the CPU time (user + system) over `--window` seconds of the network's own processes:
this process and every process it started (Ray's GCS, raylets, dashboard and agents, workers, Serve,
HAProxy, the vLLM engines), and of each by name, so the busiest background loops show. Other load on
the machine does not count. The figure: percent of one core (100 = one core fully busy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import psutil
from rich.console import Console

console = Console(stderr=True)


def _cpu_times() -> dict[int, tuple[str, float]]:
    """pid -> (command line, CPU seconds) of this process and all its descendants."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            with p.oneshot():
                t = p.cpu_times()
                cmd = " ".join(p.cmdline())[:80] or p.name()
            out[p.pid] = (cmd, t.user + t.system)
        except psutil.Error:
            continue
    return out


def _sample(window_s: float) -> tuple[float, Counter]:
    """Percent of one core used by the network's processes over the window, and by command line."""
    before = _cpu_times()
    time.sleep(window_s)
    after = _cpu_times()
    by_cmd: Counter = Counter()
    for pid, (cmd, t) in after.items():
        by_cmd[cmd] += t - before[pid][1] if pid in before else t  # a process born in the window: all of it
    total = sum(by_cmd.values())
    return 100.0 * total / window_s, by_cmd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--settle", type=float, default=60.0)
    ap.add_argument("--window", type=float, default=60.0)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from deploy.config import NetworkConfig
    from deploy.network import LocalNetwork

    cfg = NetworkConfig(port=8000 + os.getpid() % 1000, state_dir=Path(f"/tmp/meritnet-idle-{os.getpid()}"))
    with console.status("Starting the demo network..."):
        net = LocalNetwork(cfg).start()
    try:
        with console.status(f"Settling {args.settle:.0f} s, then measuring {args.window:.0f} s of idle..."):
            time.sleep(args.settle)
            idle, by_cmd = _sample(args.window)
    finally:
        net.stop()
    out = {
        "idle_pct_of_one_core": round(idle, 2),
        "busiest": {cmd: round(100.0 * t / args.window, 2) for cmd, t in by_cmd.most_common(12)},
        "window_s": args.window,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps(out))


if __name__ == "__main__":
    main()
