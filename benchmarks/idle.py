"""CPU the demo network burns with no traffic at all: the cost of just being up.

    python -m benchmarks.idle --out FILE.json [--settle 60] [--window 60]

Starts the network `make demo` starts (embedded defaults), waits `--settle` seconds for start-up work
to end, then sums the CPU time (user + system) over `--window` seconds of the network's own processes:
this process and every process it started (Ray's GCS, raylets, dashboard and agents, workers, Serve,
HAProxy, the vLLM engines), and of each by name, so the busiest background loops show. Other load on
the machine does not count. The figure: percent of one core (100 = one core fully busy).

`by_group` splits it by owner: `ray` (GCS, raylets, dashboard and its agents, idle workers, the Serve
controller and ingress: what any Ray Serve application on this cluster pays), `control_plane`
(meritnet's registry, gateway, usage store, settlement), `validators` (validators, their reference
engines, consensus, shadow feed), `nodes` (node replicas and their vLLM engines) and `driver` (the
process that started the network). A process belongs to its own group, or to its nearest ancestor's
(a vLLM engine core to the replica that started it).
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


# (group, fragments of a process title), first match wins; Ray names actor processes "ray::<Class>".
GROUPS = (
    ("nodes", ("ServeReplica:node-",)),
    ("validators", ("ValidatorActor", "ReferenceEngineService", "ConsensusService", "ShadowFeed")),
    ("control_plane", ("NodeRegistry", "ServeReplica:meritnet:", "UsageStore", "Settlement", "anvil")),
    ("ray", ("ray::", "ray/", "haproxy")),
)


def _group_of(cmd: str) -> str | None:
    return next((group for group, needles in GROUPS if any(n in cmd for n in needles)), None)


def _owner(pid: int, tree: dict[int, tuple[str, int]], driver: int) -> str:
    """The group of `pid` in `tree` (pid -> (title, parent pid)): its own, else its nearest ancestor's
    below the driver; "driver" for the driver itself, "other" when nothing on the way has one."""
    if pid == driver:
        return "driver"
    title, parent = tree[pid]
    own = _group_of(title)
    if own is not None:
        return own
    return _owner(parent, tree, driver) if parent in tree and parent != driver else "other"


def _cpu_times() -> dict[int, tuple[str, str, float]]:
    """pid -> (command line, group, CPU seconds) of this process and all its descendants."""
    me = psutil.Process()
    tree: dict[int, tuple[str, int]] = {}
    cpu: dict[int, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            with p.oneshot():
                t = p.cpu_times()
                tree[p.pid] = (" ".join(p.cmdline()) or p.name(), p.ppid())
                cpu[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return {pid: (title[:80], _owner(pid, tree, me.pid), cpu[pid]) for pid, (title, _) in tree.items()}


def _sample(window_s: float) -> tuple[float, Counter, Counter]:
    """Percent of one core used by the network's processes over the window, by command line and group."""
    before = _cpu_times()
    time.sleep(window_s)
    after = _cpu_times()
    by_cmd: Counter = Counter()
    by_group: Counter = Counter()
    for pid, (cmd, group, t) in after.items():
        used = t - before[pid][2] if pid in before else t  # a process born in the window: all of it
        by_cmd[cmd] += used
        by_group[group] += used
    return 100.0 * sum(by_cmd.values()) / window_s, by_cmd, by_group


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
        t0 = time.monotonic()
        net = LocalNetwork(cfg).start()
        start_s = time.monotonic() - t0
    try:
        with console.status(f"Settling {args.settle:.0f} s, then measuring {args.window:.0f} s of idle..."):
            time.sleep(args.settle)
            idle, by_cmd, by_group = _sample(args.window)
    finally:
        net.stop()
    out = {
        "idle_pct_of_one_core": round(idle, 2),
        "by_group": {g: round(100.0 * t / args.window, 2) for g, t in by_group.most_common()},
        "busiest": {cmd: round(100.0 * t / args.window, 2) for cmd, t in by_cmd.most_common(20)},
        "window_s": args.window,
        "start_s": round(start_s, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.write_text(json.dumps(out, indent=2))
    console.print_json(json.dumps(out))


if __name__ == "__main__":
    main()
