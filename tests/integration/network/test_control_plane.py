"""The control plane is closed (issue 10): the network's Ray cluster runs with token authentication, so
a process without the network's token cannot join it or call its actors (the ledger, the registry,
the settlement actor); the control-plane actors live on the head node."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

PROBE = (
    "import ray; ray.init(address={address!r}, namespace='meritnet', log_to_driver=False); "
    "print(ray.get(ray.get_actor('meritnet-usage').__ray_ready__.remote(), timeout=30))"
)


def _probe(address: str, env: dict) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            [sys.executable, "-c", PROBE.format(address=address)],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        return None  # never got in


def test_a_process_without_the_token_cannot_reach_the_control_plane(network, tmp_path):
    from cluster.local import AUTH_TOKEN_FILE

    address = network.cluster.address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    outsider = _probe(address, env)
    assert outsider is None or outsider.returncode != 0, outsider.stdout
    token_file = network.config.state_dir / AUTH_TOKEN_FILE
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    member = _probe(address, {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert member is not None and member.returncode == 0, member.stderr[-2000:] if member else "timeout"


def test_control_plane_actors_run_on_the_head_node(network):
    import ray
    from ray.util.state import list_actors

    from cluster.local import state_address

    head = next(
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("node:__internal_head__")
    )
    alive = list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], limit=1000)
    control = ("meritnet-registry", "meritnet-usage", "meritnet-settlement")
    placed = {a.name: a.node_id for a in alive if a.name in control}
    assert set(placed) == set(control), placed
    gateway = {a.node_id for a in alive if a.class_name.startswith("ServeReplica:meritnet:gateway")}
    assert set(placed.values()) | gateway == {head}, (placed, gateway)


def test_the_usage_store_comes_back_after_a_crash_and_nothing_is_lost(network, client, usage_records):
    """Issue 13: the store had no restarts and the gateway kept its dead handle (every request 503'd)."""
    import ray

    before = client.completions.with_raw_response.create(model="default", prompt="before", max_tokens=2)
    ray.kill(ray.get_actor("meritnet-usage", namespace="meritnet"), no_restart=False)
    after = client.completions.with_raw_response.create(model="default", prompt="after", max_tokens=2)
    records = usage_records()
    for raw in (before, after):
        assert records[raw.headers["x-meritnet-request-id"]].status == "ok"


def test_the_registry_comes_back_with_its_nodes_after_a_crash(network, client):
    """Issue 13: the registry was in memory and came back empty (every model 404'd)."""
    import time

    import ray

    from cluster.registry import get_registry

    ray.kill(get_registry(), no_restart=False)
    served = client.completions.with_raw_response.create(model="default", prompt="during", max_tokens=2)
    assert served.headers["x-meritnet-node"]  # the gateway serves from its last snapshot meanwhile
    deadline = time.monotonic() + 60
    live: set[str] = set()
    while time.monotonic() < deadline and live != {s.node_id for s in network.specs}:
        try:
            live = {s.node_id for s in ray.get(get_registry().snapshot.remote(), timeout=10) if s.live}
        except Exception:  # noqa: BLE001 - still restarting
            live = set()
        time.sleep(0.5)
    assert live == {s.node_id for s in network.specs}
    after = client.completions.with_raw_response.create(model="default", prompt="after", max_tokens=2)
    assert after.headers["x-meritnet-node"] in live
