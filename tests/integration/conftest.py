"""Shared helpers of the integration tests (real Ray, real vLLM, real EVMs)."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def free_port() -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range (32768+ here).

    A port from bind(0) is ephemeral: the many processes a Ray cluster starts afterwards bind ephemeral
    ports too, and one of them can take it before the test's server binds it ("Failed to bind")."""
    import random

    low = 20000
    try:
        low_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low_ephemeral = 32768
    for port in random.sample(range(low, max(low + 1000, low_ephemeral)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def start_meritnet_up(args: list[str], cwd, env: dict, timeout_s: float = 900):
    """`meritnet <args>` (an `up`) as a user runs it, read until it prints "Press Ctrl-C to stop";
    (the process, what it printed so far). The caller stops it with SIGINT."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    meritnet = Path(sys.executable).with_name("meritnet")
    proc = subprocess.Popen(
        [str(meritnet), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    out: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        out.append(line)
        if "Press Ctrl-C to stop" in line:
            break
    return proc, "".join(out)


def stop_meritnet_up(proc) -> str:
    """Ctrl-C a `start_meritnet_up` process (killed if it takes over 3 minutes); what it printed since.
    The caller asserts its exit."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest


def dashboard_metrics(prefix: str) -> set[str]:
    """Metric families that deploy/grafana/dashboards/meritnet.json queries, of those named `prefix`*."""
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).parents[2] / "deploy" / "grafana" / "dashboards" / "meritnet.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    found = {m for e in exprs for m in re.findall(rf"\b{prefix}\w+", e)}
    return {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in found}


def live_families(url: str) -> set[str]:
    """Metric family names a Prometheus endpoint serves right now."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name for f in text_string_to_metric_families(httpx.get(url, timeout=30).text)}
