"""Free TCP ports on 127.0.0.1 for servers the tests start (gateways, nodes, metrics endpoints)."""

from __future__ import annotations

import socket


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
