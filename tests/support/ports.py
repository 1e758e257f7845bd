"""Free TCP ports on 127.0.0.1 for servers the tests start (gateways, nodes, metrics endpoints)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free 127.0.0.1 port in 20000-29999: below the kernel's ephemeral range (32768+ here) and below
    Ray Serve's direct-ingress ports (30000-31000, each cluster allocating its own from 30000).

    A port from bind(0) is ephemeral: the many processes a Ray cluster starts afterwards bind ephemeral
    ports too, and one of them can take it before the test's server binds it ("Failed to bind"). Drawn
    with the system's randomness: a library that seeds `random` must not make two test processes draw
    the same ports."""
    import random

    for port in random.SystemRandom().sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
