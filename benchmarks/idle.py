"""CPU the demo network burns with no traffic at all: the cost of just being up.

    python -m benchmarks.idle --out FILE.json [--settle 60] [--window 60]

Starts the network `make demo` starts (embedded defaults), waits `--settle` seconds for start-up work
to end, then sums the CPU time (user + system) of every process on the machine over `--window`
seconds, and of each process by name, so the busiest background loops show. The figure: percent of
one core (100 = one core fully busy). The machine's own baseline before the network started is
measured the same way and reported beside it.
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
    out = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        try:
            t = p.info["cpu_times"]
            cmd = " ".join(p.info["cmdline"] or [])[:80] or p.info["name"]
            out[p.pid] = (cmd, t.user + t.system)
        except (psutil.Error, TypeError):
            continue
    return out


def _sample(window_s: float) -> tuple[float, Counter]:
    """Percent of one core used by all processes over the window, and by command line."""
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

    with console.status(f"Machine baseline ({args.window:.0f} s)..."):
        baseline, _ = _sample(args.window)
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
        "idle_pct_of_one_core": round(idle - baseline, 2),
        "machine_baseline_pct": round(baseline, 2),
        "busiest": {cmd: round(100.0 * t / args.window, 2) for cmd, t in by_cmd.most_common(12)},
        "window_s": args.window,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps(out))


if __name__ == "__main__":
    main()
