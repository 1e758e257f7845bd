"""The node registry: which nodes exist, which are live, what they serve, how loaded they are.

It runs as one named, detached Ray actor. Liveness comes from Serve itself (a node is live while
its deployment has a RUNNING replica); load comes from the gateways, which push their in-flight
counts. Readers (gateways, validators) poll `snapshot()` in the background and keep a local copy,
so nothing on a request's hot path waits for the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.deployment import deployment_name
from cluster.records import NodeSpec, NodeStats

log = logging.getLogger(__name__)

REGISTRY_NAME = "meritnet-registry"
NAMESPACE = "meritnet"


@dataclass
class _Entry:
    spec: NodeSpec
    joined_at: float
    live: bool = False
    running_replicas: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)  # gateway id -> count


class NodeRegistryCore:
    """The registry's state and rules, without Ray (unit-testable).

    With `state_path`, the registered nodes (spec and join time) are written there on every change
    (atomically: a temporary file renamed over it) and read back at start, so a registry that
    crashed and was restarted by Ray knows its nodes again instead of 404ing every model."""

    def __init__(self, state_path: Path | None = None) -> None:
        self._nodes: dict[str, _Entry] = {}
        self._path = state_path
        if state_path is not None and state_path.is_file():
            for item in json.loads(state_path.read_text()):
                spec = NodeSpec.model_validate(item["spec"])
                self._nodes[spec.node_id] = _Entry(spec, joined_at=float(item["joined_at"]))

    def _save(self) -> None:
        if self._path is None:
            return
        items = [
            {"spec": e.spec.model_dump(mode="json"), "joined_at": e.joined_at} for e in self._nodes.values()
        ]
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.write_text(json.dumps(items))
        os.replace(tmp, self._path)

    def sync(self, specs: list[NodeSpec], now: float | None = None) -> None:
        """Hold exactly `specs` (the network's configured nodes): new ones join, changed ones re-join,
        others leave."""
        wanted = {s.node_id: s for s in specs}
        for node_id in [n for n, e in self._nodes.items() if wanted.get(n) != e.spec]:
            del self._nodes[node_id]
        for spec in specs:
            if spec.node_id not in self._nodes:
                self._nodes[spec.node_id] = _Entry(spec, joined_at=now if now is not None else time.time())
        self._save()

    def register(self, spec: NodeSpec, now: float | None = None) -> None:
        current = self._nodes.get(spec.node_id)
        if current is not None and current.spec != spec:
            raise ValueError(
                f"node id {spec.node_id!r} is already registered with a different spec; "
                "unregister it first or pick another node id"
            )
        if current is None:
            self._nodes[spec.node_id] = _Entry(spec, joined_at=now if now is not None else time.time())
            self._save()

    def unregister(self, node_id: str) -> None:
        if self._nodes.pop(node_id, None) is not None:
            self._save()

    def specs(self) -> list[NodeSpec]:
        return [e.spec for e in self._nodes.values()]

    def set_liveness(self, replicas_running: dict[str, int]) -> None:
        """`replicas_running`: node id -> RUNNING replicas per Serve (missing = 0)."""
        for node_id, entry in self._nodes.items():
            running = replicas_running.get(node_id, 0)
            entry.running_replicas = running
            entry.live = running > 0

    def report_load(self, gateway_id: str, in_flight: dict[str, int]) -> None:
        for node_id, entry in self._nodes.items():
            entry.in_flight[gateway_id] = max(0, int(in_flight.get(node_id, 0)))

    def snapshot(self) -> list[NodeStats]:
        return [
            NodeStats(
                node_id=e.spec.node_id,
                model_id=e.spec.model_id,
                operator=e.spec.operator,
                accelerator_type=e.spec.accelerator_type,
                capacity=e.spec.capacity,
                live=e.live,
                running_replicas=e.running_replicas,
                in_flight=sum(e.in_flight.values()),
                joined_at=e.joined_at,
            )
            for e in self._nodes.values()
        ]


def _running_replicas_from_serve(specs: list[NodeSpec]) -> dict[str, int]:
    """Ask Serve how many RUNNING replicas each node's deployment has (a blocking call)."""
    from ray import serve

    apps = serve.status().applications
    running: dict[str, int] = {}
    for spec in specs:
        name = deployment_name(spec)
        app = apps.get(name)
        if app is None or name not in app.deployments:
            continue
        dep = app.deployments[name]
        states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        running[spec.node_id] = int(states.get("RUNNING", 0))
    return running


class NodeRegistry:
    """Ray actor around NodeRegistryCore that polls Serve for liveness."""

    def __init__(self, poll_interval_s: float = 1.0, state_path: str | None = None) -> None:
        self._core = NodeRegistryCore(Path(state_path) if state_path else None)
        self._poll_interval_s = poll_interval_s
        self._poller: asyncio.Task | None = None

    async def _poll(self) -> None:
        while True:
            try:
                running = await asyncio.to_thread(_running_replicas_from_serve, self._core.specs())
                self._core.set_liveness(running)
            except Exception as exc:  # noqa: BLE001 - Serve restarting: keep the last view, try again
                log.warning("registry: could not read Serve status (%s); keeping last view", exc)
            await asyncio.sleep(self._poll_interval_s)

    def _ensure_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def register(self, spec: NodeSpec) -> None:
        self._ensure_polling()
        self._core.register(spec)

    async def unregister(self, node_id: str) -> None:
        self._core.unregister(node_id)

    async def sync(self, specs: list[NodeSpec]) -> None:
        self._ensure_polling()
        self._core.sync(specs)

    async def report_load(self, gateway_id: str, in_flight: dict[str, int]) -> None:
        self._core.report_load(gateway_id, in_flight)

    async def snapshot(self) -> list[NodeStats]:
        self._ensure_polling()
        return self._core.snapshot()

    async def specs(self) -> list[NodeSpec]:
        return self._core.specs()


def get_or_create_registry(poll_interval_s: float = 1.0, state_path: Path | None = None):
    """The cluster's registry actor handle (created detached on first use; with `state_path` its nodes
    survive a restart of the actor)."""
    import ray

    return (
        ray.remote(NodeRegistry)
        .options(
            name=REGISTRY_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            resources={"head": 0.01},  # control plane: on the head node, never beside a node's engine
        )
        .remote(poll_interval_s, str(state_path) if state_path else None)
    )


def get_registry():
    """Handle to the running registry; raises if the network is not up."""
    import ray

    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
