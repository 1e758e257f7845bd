"""A node dies under traffic: it is banned and leaves the registry, requests keep succeeding on the
other node, and once Serve has restarted it (and its ban has expired) it gets traffic again.

Named test_zz_* so it runs after the other modules that share this package's network.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def _node_of(client, i: int) -> str:
    raw = client.completions.with_raw_response.create(model="default", prompt=f"k{i}", max_tokens=4)
    return raw.headers["x-meritnet-node"]


def _live(node_id: str) -> bool:
    import ray

    from cluster.registry import get_registry

    return {s.node_id: s.live for s in ray.get(get_registry().snapshot.remote())}[node_id]


def test_killed_node_is_banned_leaves_registry_and_comes_back(network, client):
    import ray
    from ray.util.state import list_actors

    victim = next(
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name == "ServeReplica:node-l4-b:node-l4-b"
    )
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)

    # Every request still succeeds; at most the first ones try the dead node (and are retried).
    served = [_node_of(client, i) for i in range(8)]
    assert set(served) == {"h100-a"}

    deadline = time.monotonic() + 120
    while _live("l4-b") and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _live("l4-b"), "the registry still lists the killed node as live"

    # Serve starts a new replica (a fresh vLLM engine); the node rejoins and, its ban expired,
    # receives traffic again.
    deadline = time.monotonic() + 600  # a fresh engine start; minutes on a loaded 2-core machine
    while not _live("l4-b") and time.monotonic() < deadline:
        time.sleep(1.0)
    assert _live("l4-b"), "the restarted node never became live again"
    # Under concurrent load (the way traffic spreads), the rejoined node gets requests again.
    import concurrent.futures as cf

    seen: set[str] = set()
    deadline = time.monotonic() + 300
    with cf.ThreadPoolExecutor(8) as pool:
        while "l4-b" not in seen and time.monotonic() < deadline:
            seen.update(pool.map(lambda i: _node_of(client, i), range(16)))
    assert "l4-b" in seen
