"""The node registry: which nodes exist, which are live, what they serve, how loaded they are.

It runs as one named, detached Ray actor. A managed node's liveness comes from Serve itself (live while
its deployment has a RUNNING replica), an open node's from a health probe of its endpoint every poll;
load comes from the gateways, which push their in-flight
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

from cluster import services
from cluster.local import HEAD_NODE
from cluster.pinned_http import pinned_client
from cluster.probe import ProbeFailed, get_bounded
from cluster.records import NodeLink, NodeSpec, NodeStats, deployment_name
from cluster.registration import (
    OpenNodePolicy,
    RegistrationError,
    canonical_ip,
    endpoint_key,
    endpoint_parts,
    pinned,
)

log = logging.getLogger(__name__)

REGISTRY_NAME, NAMESPACE = services.REGISTRY, services.NAMESPACE
# An open node counts as dead after missing this many health probes in a row, each allowed
# OPEN_NODE_PROBE_TIMEOUT_S: about 30 s for a hung node (a refused connection fails at once: ~10 s). An
# operator's machine that is busy generating may answer /health late for a while; requests that fail on
# it meanwhile are the gateway's to handle (it bans and retries within a request).
OPEN_NODE_MISSES = 5
OPEN_NODE_PROBE_TIMEOUT_S = 4.0
# Node ids an open node ever held, remembered with their operator so an id (and the reputation that
# validators attached to it) never passes to another operator. Bounded so the state file stays small.
MAX_REMEMBERED_IDS = 16384


@dataclass
class _Entry:
    spec: NodeSpec
    joined_at: float
    live: bool = False
    running_replicas: int = 0
    missed: int = 0  # an open node's health probes missed in a row
    in_flight: dict[str, int] = field(default_factory=dict)  # gateway id -> count
    secret: str | None = None  # an open node's per-node secret (the gateway presents it); never in a snapshot


class NodeRegistryCore:
    """The registry's state and rules, without Ray (unit-testable).

    Managed nodes come from the network's config (`sync`); open nodes join and leave by signed
    registration. A join is two calls: `claim` (before the gateway probes the endpoint) takes the
    operator's nonce and runs every check that needs no network, so a replayed or doomed message costs
    no probe; `join` (after the probe) records the node under that claim. Each operator's last nonce is
    kept, so a signed message is accepted once, and every node id an open node held is remembered with
    its operator (`owners`), so an id never changes hands. `policy` (OpenNodePolicy) bounds where an
    open node may be, how many one operator holds and the capacity it may claim.

    With `state_path`, nodes (spec, join time, an open node's secret), nonces and owners are written
    there on every change (atomically, mode 0600: it holds secrets) and read back at start, so a
    registry that crashed and was restarted by Ray knows its nodes again instead of 404ing every model."""

    def __init__(
        self,
        state_path: Path | None = None,
        max_open_nodes: int = 256,
        policy: OpenNodePolicy | None = None,
    ) -> None:
        self._nodes: dict[str, _Entry] = {}
        self._max_open = (
            max_open_nodes  # keys cost nothing: the registry, its file and the probes stay bounded
        )
        self.policy = policy or OpenNodePolicy()  # admits no open node until deploy says the network does
        self._nonces: dict[str, int] = {}  # operator address -> last accepted registration nonce
        self._owners: dict[str, str] = {}  # node id an open node ever held -> its operator
        self._claims: dict[str, tuple[int, str]] = {}  # operator -> (nonce, node id) claimed, not joined
        self._path = state_path
        if state_path is not None and state_path.is_file():
            data = json.loads(state_path.read_text())
            if isinstance(data, list):  # the format before open nodes: managed nodes only
                data = {"nodes": data, "nonces": {}}
            for item in data["nodes"]:
                spec = NodeSpec.model_validate(item["spec"])
                self._nodes[spec.node_id] = _Entry(
                    spec, joined_at=float(item["joined_at"]), secret=item.get("secret")
                )
            self._nonces = {a: int(n) for a, n in data["nonces"].items()}
            self._owners = {str(n): str(a) for n, a in data.get("owners", {}).items()}
            for entry in self._nodes.values():  # files from before owners were kept
                if entry.spec.endpoint is not None:
                    self._owners.setdefault(entry.spec.node_id, entry.spec.operator)

    def _save(self) -> None:
        if self._path is None:
            return
        nodes = [
            {"spec": e.spec.model_dump(mode="json"), "joined_at": e.joined_at, "secret": e.secret}
            for e in self._nodes.values()
        ]
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"nodes": nodes, "nonces": self._nonces, "owners": self._owners}, f)
        os.replace(tmp, self._path)

    def sync(
        self, specs: list[NodeSpec], now: float | None = None, policy: OpenNodePolicy | None = None
    ) -> None:
        """Hold exactly `specs` as the managed nodes (the network's config): new ones join, changed ones
        re-join, others leave. Open nodes are not the config's to change. With `policy`, later joins
        follow it (nodes already in stay until they re-join)."""
        if policy is not None:
            self.policy = policy
        wanted = {s.node_id: s for s in specs}
        for node_id in [
            n for n, e in self._nodes.items() if e.spec.endpoint is None and wanted.get(n) != e.spec
        ]:
            del self._nodes[node_id]
        for spec in specs:
            current = self._nodes.get(spec.node_id)
            if current is not None and current.spec.endpoint is not None:
                # the runner's config wins: an operator could otherwise take the id of a node about to be added
                log.warning(
                    "open node %s leaves: the network's config now names a node with its id", spec.node_id
                )
                del self._nodes[spec.node_id]
                current = None
            if current is None:
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

    # ---- open nodes (signatures and probes are checked by the caller; nonces and ownership here) ----
    def _check_nonce(self, operator: str, nonce: int) -> None:
        if nonce <= self._nonces.get(operator, -1):
            raise RegistrationError(
                409,
                "this registration was already used (its nonce is not above the last one); sign a new one",
                "replayed",
            )

    def _check_owner(self, node_id: str, operator: str) -> None:
        current = self._nodes.get(node_id)
        if current is not None and current.spec.endpoint is None:
            raise RegistrationError(
                409, f"node id {node_id!r} is a node of the network itself; pick another", "node_id_taken"
            )
        if self._owners.get(node_id, operator) != operator:
            raise RegistrationError(
                409,
                f"node id {node_id!r} is, or was, another operator's (an id keeps its reputation, so it "
                "never changes hands); pick another",
                "node_id_taken",
            )

    def _check_join(self, spec: NodeSpec) -> None:
        """Every join rule that needs no network: policy, ownership, where the node is, caps."""
        assert spec.endpoint is not None, "an open node has an endpoint"
        self.policy.admits_open_nodes()
        self.policy.check_capacity(spec.capacity)
        self._check_owner(spec.node_id, spec.operator)
        _, host, port = endpoint_parts(spec.endpoint)
        try:
            ip = canonical_ip(host)
        except ValueError:
            ip = None
        if ip is None or pinned(spec.endpoint, ip) != spec.endpoint:
            raise RegistrationError(
                400, "an open node is recorded at the IP its endpoint resolved to", "not_pinned"
            )
        self.policy.check_address(ip, port)
        others = [e.spec for n, e in self._nodes.items() if e.spec.endpoint is not None and n != spec.node_id]
        if any(endpoint_key(o.endpoint) == (str(ip), port) for o in others):
            raise RegistrationError(
                409, "another node is registered at this address and port", "endpoint_taken"
            )
        mine = sum(o.operator == spec.operator for o in others)
        if mine >= self.policy.max_per_operator:
            raise RegistrationError(
                403,
                f"operator {spec.operator} already holds {mine} open nodes, this network's cap per "
                "operator; let one leave (`meritnet node leave`) before joining another",
                "operator_full",
            )
        if len(others) >= self._max_open:
            raise RegistrationError(
                403,
                f"the network admits at most {self._max_open} open nodes; try again later",
                "network_full",
            )
        if spec.node_id not in self._owners and len(self._owners) >= MAX_REMEMBERED_IDS:
            raise RegistrationError(
                403,
                "this network has given out all the open-node ids it keeps; re-join with a node id "
                "you held before",
                "network_full",
            )

    def claim(self, spec: NodeSpec, nonce: int) -> None:
        """Take `nonce` for a join of `spec` before its endpoint is probed: the same message posted
        again (even at once) is a replay and is never probed. A failed probe spends the nonce."""
        self._check_nonce(spec.operator, nonce)
        self._check_join(spec)
        self._nonces[spec.operator] = nonce
        self._claims[spec.operator] = (nonce, spec.node_id)
        self._save()

    def join(self, spec: NodeSpec, secret: str, nonce: int, now: float | None = None) -> None:
        """Add (or move: same operator, new endpoint) the open node `spec`, under the claim of `nonce`
        (rules are checked again: another join may have landed while this one was probed)."""
        if self._claims.get(spec.operator) != (nonce, spec.node_id):
            raise RegistrationError(
                409,
                "this registration has no claim here (a newer one of yours replaced it, or the network "
                "restarted while probing); sign a new one",
                "replayed",
            )
        self._check_join(spec)
        del self._claims[spec.operator]
        entry = _Entry(spec, joined_at=now if now is not None else time.time(), secret=secret)
        current = self._nodes.get(spec.node_id)
        same_place = current is not None and (current.spec.endpoint, current.spec.tls_name) == (
            spec.endpoint,
            spec.tls_name,
        )
        if same_place:  # a new secret, the same node
            entry.joined_at, entry.live = current.joined_at, current.live
            entry.running_replicas = current.running_replicas
        self._nodes[spec.node_id] = entry
        self._owners[spec.node_id] = spec.operator
        self._save()

    def leave(self, node_id: str, operator: str, nonce: int) -> None:
        self._check_nonce(operator, nonce)
        current = self._nodes.get(node_id)
        if current is None:
            raise RegistrationError(404, f"node {node_id!r} is not registered", "unknown_node")
        if current.spec.endpoint is None or current.spec.operator != operator:
            raise RegistrationError(
                409, f"node id {node_id!r} is held by another operator; pick another", "node_id_taken"
            )
        self._nonces[operator] = nonce
        del self._nodes[node_id]  # its id stays the operator's (`owners`)
        self._save()

    def links(self) -> dict[str, NodeLink]:
        """Open nodes' endpoints and secrets (for gateways only: never part of a snapshot)."""
        return {
            n: NodeLink(e.spec.endpoint, e.secret, e.spec.tls_name)
            for n, e in self._nodes.items()
            if e.spec.endpoint is not None and e.secret is not None
        }

    def specs(self) -> list[NodeSpec]:
        return [e.spec for e in self._nodes.values()]

    def set_liveness(self, replicas_running: dict[str, int]) -> None:
        """`replicas_running`: node id -> RUNNING replicas per Serve, or 1 for an open node that answered its
        health probe (missing = 0). Serve's word is final for a managed node; an open node stays live
        until it misses `OPEN_NODE_MISSES` probes in a row, so one slow answer from a busy machine
        does not take it off the network (requests that fail on it are handled by the gateway's bans)."""
        for node_id, entry in self._nodes.items():
            running = replicas_running.get(node_id, 0)
            entry.running_replicas = running
            entry.missed = 0 if running > 0 else entry.missed + 1
            is_open = entry.spec.endpoint is not None
            tolerated = is_open and entry.live and entry.missed < OPEN_NODE_MISSES
            if is_open and entry.live and not running:
                log.warning(
                    "open node %s missed health probe %d of %d%s", node_id, entry.missed,
                    OPEN_NODE_MISSES, "" if tolerated else ": no longer live",
                )  # fmt: skip
            elif is_open and running and not entry.live:
                log.info("open node %s is live", node_id)
            entry.live = running > 0 or tolerated

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
                kind="managed" if e.spec.endpoint is None else "open",
                task=e.spec.task,
            )
            for e in self._nodes.values()
        ]


def _running_replicas_from_serve(specs: list[NodeSpec]) -> dict[str, int]:
    """Ask Serve how many RUNNING replicas each node's deployment has (a blocking call).

    It reads the Serve controller's instance details as the plain dict `serve.status()` builds its
    answer from (Ray is pinned in pyproject.toml), without that answer's pydantic parse: measured on the
    demo, 76 ms of CPU per call in the registry (3.7% of a core at one call per 2 s) against 1.3 ms.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    apps = client.get_serve_details().get("applications", {}) if client is not None else {}
    running: dict[str, int] = {}
    for spec in specs:
        name = deployment_name(spec)
        deployment = apps.get(name, {}).get("deployments", {}).get(name)
        if deployment is not None:  # a state is Serve's ReplicaState, a str enum
            running[spec.node_id] = sum(r.get("state") == "RUNNING" for r in deployment.get("replicas", []))
    return running


async def _probe_open_nodes(
    client, links: dict[str, NodeLink], timeout_s: float = OPEN_NODE_PROBE_TIMEOUT_S
) -> dict[str, int]:
    """1 for each open node whose /health answers 200 within `timeout_s`, else 0 (concurrently)."""

    async def one(link: NodeLink) -> int:
        try:
            status, _ = await get_bounded(client, link.endpoint, "/health", 4096, timeout_s, link.tls_name)
        except ProbeFailed:
            return 0
        return int(status == 200)

    results = await asyncio.gather(*(one(link) for link in links.values()))
    return dict(zip(links, results, strict=True))


def _refused(call, *args) -> tuple[int, str, str] | None:
    try:
        call(*args)
    except RegistrationError as exc:
        return exc.status, str(exc), exc.code
    return None


def refusal_of(answer: tuple[int, str, str] | None) -> None:
    """Raise the RegistrationError a registry actor call returned (if any)."""
    if answer is not None:
        raise RegistrationError(*answer)


class NodeRegistry:
    """Ray actor around NodeRegistryCore that polls Serve (managed nodes) and endpoints (open nodes)
    for liveness."""

    def __init__(
        self,
        poll_interval_s: float = 2.0,
        state_path: str | None = None,
        policy: OpenNodePolicy | None = None,
    ) -> None:
        # the policy is a constructor argument so that Ray, restarting a crashed registry with the same
        # arguments, restores it too (it was lost on restart: every later join got `no_validators`)
        self._core = NodeRegistryCore(Path(state_path) if state_path else None, policy=policy)
        self._poll_interval_s = poll_interval_s
        self._poller: asyncio.Task | None = None
        self._http = None  # one keep-alive client for every liveness probe, made with the first open node

    async def _probe(self) -> dict[str, int]:
        links = self._core.links()
        if not links:
            return {}
        if self._http is None:
            self._http = pinned_client(headers={"accept-encoding": "identity"})
        return await _probe_open_nodes(self._http, links)

    async def _poll(self) -> None:
        while True:
            try:
                managed = [s for s in self._core.specs() if s.endpoint is None]
                running, probed = await asyncio.gather(
                    asyncio.to_thread(_running_replicas_from_serve, managed), self._probe()
                )
                self._core.set_liveness({**running, **probed})
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

    async def sync(self, specs: list[NodeSpec], policy: OpenNodePolicy | None = None) -> None:
        self._ensure_polling()
        self._core.sync(specs, policy=policy)

    async def policy(self) -> OpenNodePolicy:
        return self._core.policy

    # A refusal is returned, not raised, so its status and code cross the actor boundary intact
    # (`refusal_of` turns it back into the RegistrationError on the caller's side).
    async def claim(self, spec: NodeSpec, nonce: int) -> tuple | None:
        return _refused(self._core.claim, spec, nonce)

    async def join(self, spec: NodeSpec, secret: str, nonce: int) -> tuple | None:
        self._ensure_polling()
        return _refused(self._core.join, spec, secret, nonce)

    async def leave(self, node_id: str, operator: str, nonce: int) -> tuple | None:
        return _refused(self._core.leave, node_id, operator, nonce)

    async def links(self) -> dict[str, NodeLink]:
        return self._core.links()

    async def report_load(self, gateway_id: str, in_flight: dict[str, int]) -> None:
        self._core.report_load(gateway_id, in_flight)

    async def snapshot(self) -> list[NodeStats]:
        self._ensure_polling()
        return self._core.snapshot()

    async def specs(self) -> list[NodeSpec]:
        return self._core.specs()


def get_or_create_registry(
    poll_interval_s: float = 2.0, state_path: Path | None = None, policy: OpenNodePolicy | None = None
):
    """The cluster's registry actor handle (created detached on first use; with `state_path` its nodes
    survive a restart of the actor, and so does `policy`)."""
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
            resources=HEAD_NODE,  # control plane: on the head node, never beside a node's engine
        )
        .remote(poll_interval_s, str(state_path) if state_path else None, policy)
    )


def get_registry():
    """Handle to the running registry; raises if the network is not up."""
    import ray

    return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
