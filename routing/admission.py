"""Admitting open nodes: the gateway's half of `meritnet node join` / `leave` / `list`.

    POST /v1/nodes         a signed join (cluster/registration.py) -> 201 with the node's secret
    POST /v1/nodes/leave   a signed leave by the node's operator   -> 200
    GET  /v1/nodes         every node: id, kind, operator, model, accelerator, live (no endpoints, no secrets)
    GET  /v1/nodes/domain  what to sign: EIP-712 domain name, version and chain id

Order of checks, cheapest first, so a refused message costs the network little: strict parse ->
signature (canonical form only), chain, network id and expiry -> the model is one the network can meter
and verify -> the network's OpenNodePolicy (held by the registry: validators, capacity cap) -> the
endpoint's host is resolved ONCE, canonicalised and checked (public, or in `open_node_networks`; never
the network's own gateway or control-plane ports) and the node is recorded at that IP (an https
endpoint given by name keeps the name its certificate must carry: cluster/pinned_http.py) -> the registry
*claims* the nonce and checks ownership, endpoint uniqueness and caps (so a message posted again, even
at once, is a replay and is never probed) -> the pinned endpoint answers /health and lists the model in
/v1/models (bounded in time and size: cluster/probe.py) -> join under the claim. Every refusal is an
OpenAI-shaped 4xx saying how to fix it.

The probe is not a port scanner: every way it can fail gets one answer, which says what a node must do
and nothing of what the port did. It carries HOP_HEADER, as every request the gateway forwards should,
and a gateway refuses requests that carry it (`refuse_hop`), so a node that relays to a gateway fails.
The probe only shows that the endpoint is up and configured for the model; whether its outputs really
come from that model is for the validators to find out, as for every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from cluster.pinned_http import pinned_client
from cluster.probe import ProbeFailed, get_bounded
from cluster.records import NodeSpec, NodeTask
from cluster.registration import (
    DOMAIN_NAME,
    DOMAIN_VERSION,
    HOP_HEADER,
    IP,
    NON_PUBLIC,
    OpenNodePolicy,
    RegistrationError,
    SignedRegistration,
    canonical_ip,
    endpoint_parts,
    pinned,
    tls_name_of,
    verify,
)
from cluster.registry import refusal_of
from routing import errors

PROBE_TIMEOUT_S = 5.0
PROBE_MAX_BYTES = 64 << 10  # a /v1/models answer larger than this is not a node's
_REMOTE_TIMEOUT_S = 10.0
RESOLVE_TIMEOUT_S = 5.0
PROBE_FAILED = (
    "the endpoint did not pass the join probe: it must be reachable from the network and answer "
    "GET /health with 200 and GET /v1/models with an OpenAI model list naming the signed model "
    "(`meritnet node serve` does both; check with curl from another machine), then sign a new join"
)


def _refused(exc: RegistrationError) -> errors.APIError:
    return errors.APIError(exc.status, str(exc), type="invalid_request_error", code=exc.code)


def parse_signed(raw: Any) -> SignedRegistration:
    try:
        return SignedRegistration.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise errors.APIError(
            400,
            f"invalid registration: {where}: {first['msg']}",
            type="invalid_request_error",
            code="invalid_registration",
        ) from None


def refuse_hop(headers) -> None:
    """Raise a 400 for a request that a gateway forwarded (HOP_HEADER): a node relays to a gateway."""
    if HOP_HEADER in headers:
        raise errors.APIError(
            400,
            f"this request carries {HOP_HEADER}: it came from a meritnet gateway, and a gateway does not "
            "serve as a node; a node must run its own engine (`meritnet node serve`)",
            type="invalid_request_error",
            code="forwarding_loop",
        )


async def _check_probe(endpoint: str, model: str, tls_name: str | None) -> None:
    headers = {"accept-encoding": "identity", HOP_HEADER: "1"}
    async with pinned_client(timeout=PROBE_TIMEOUT_S, headers=headers) as client:
        health, _ = await get_bounded(client, endpoint, "/health", PROBE_MAX_BYTES, PROBE_TIMEOUT_S, tls_name)
        if health != 200:
            raise ProbeFailed("unhealthy")
        status, data = await get_bounded(
            client, endpoint, "/v1/models", PROBE_MAX_BYTES, PROBE_TIMEOUT_S, tls_name
        )
    if status != 200:
        raise ProbeFailed("no model list")
    try:
        served = [m["id"] for m in json.loads(data)["data"]]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ProbeFailed("not a model list") from None
    if model not in served:
        raise ProbeFailed("wrong model")


async def probe(endpoint: str, model: str, tls_name: str | None = None) -> None:
    """Raise RegistrationError unless the pinned `endpoint` (with its certificate name `tls_name`, as
    every later call: cluster/pinned_http.py) answers /health and lists `model` in /v1/models: one
    answer for every failure (what a port answered is not for a stranger to learn)."""
    try:
        await _check_probe(endpoint, model, tls_name)
    except (ProbeFailed, httpx.HTTPError, httpx.InvalidURL):
        raise RegistrationError(422, PROBE_FAILED, "probe_failed") from None


def own_addresses() -> frozenset[IP]:
    """This machine's addresses (the gateway runs on the head, beside the control plane)."""
    found: set[str] = set()
    with contextlib.suppress(Exception):  # no psutil, or no permission: the host name's addresses below
        import psutil

        found |= {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    with contextlib.suppress(OSError):
        found |= {str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None)}
    own: set[IP] = set()
    for address in found:
        try:
            own.add(canonical_ip(address.split("%", 1)[0]))
        except ValueError:
            continue  # a MAC address from psutil
    return frozenset(own)


async def resolve_once(host: str) -> IP | None:
    """The canonical first address `host` resolves to (an IP literal is itself), or None."""
    try:
        return canonical_ip(host)
    except ValueError:
        pass
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
        return canonical_ip(str(infos[0][4][0]).split("%", 1)[0])
    except (OSError, TimeoutError, IndexError, ValueError, UnicodeError):
        return None


class Admission:
    """Join and leave against the registry actor; `models` are the ones this network meters. The
    network's OpenNodePolicy comes from the registry (deploy sets it there) unless given; `resolve` and
    `own` are the resolver and this machine's addresses (injectable for tests)."""

    def __init__(
        self,
        registry,
        chain_id: int,
        network_id: str,
        models: Mapping[str, NodeTask],
        policy: OpenNodePolicy | None = None,
        resolve=resolve_once,
        own: Iterable[IP] | None = None,
        probe=probe,
    ) -> None:
        self._registry = registry
        self.chain_id, self.network_id = chain_id, network_id
        self._models = models
        self._policy, self._resolve, self._probe = policy, resolve, probe
        self._own = frozenset(own) if own is not None else None

    def domain(self) -> dict:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chain_id": self.chain_id,
            "network_id": self.network_id,
        }

    async def _call(self, method, *args):
        refusal_of(await asyncio.wait_for(method.remote(*args), _REMOTE_TIMEOUT_S))

    async def _current_policy(self) -> OpenNodePolicy:
        if self._policy is not None:
            return self._policy
        return await asyncio.wait_for(self._registry.policy.remote(), _REMOTE_TIMEOUT_S)

    async def _pin(self, endpoint: str, policy: OpenNodePolicy) -> tuple[str, str | None]:
        """`endpoint` at the one IP its host resolves to, if the policy lets a node be there, and the
        name an https endpoint's certificate must carry (None for http or an IP)."""
        _, host, port = endpoint_parts(endpoint)
        try:
            name = tls_name_of(endpoint)
        except ValueError as exc:
            raise RegistrationError(422, f"the endpoint's host: {exc}", "endpoint_name") from None
        ip = await self._resolve(host)
        if ip is None:
            raise RegistrationError(422, f"the endpoint's host {NON_PUBLIC}", "endpoint_not_public")
        if self._own is None:
            self._own = await asyncio.to_thread(own_addresses)
        policy.check_address(ip, port, self._own)
        return pinned(endpoint, ip), name

    async def join(self, raw: Any) -> dict:
        try:
            reg = verify(parse_signed(raw), self.chain_id, self.network_id)
            if reg.action != "join":
                raise RegistrationError(400, "this is a leave; send it to /v1/nodes/leave", "wrong_action")
            if reg.model not in self._models:
                raise RegistrationError(
                    422,
                    f"this network does not serve model {reg.model!r} (it meters and verifies: {sorted(self._models)})",
                    "unknown_model",
                )
            policy = await self._current_policy()
            policy.admits_open_nodes()
            policy.check_capacity(reg.capacity)
            endpoint, name = await self._pin(reg.endpoint, policy)
            spec = NodeSpec(
                node_id=reg.node_id,
                operator=reg.operator,
                model_id=reg.model,
                task=self._models[reg.model],  # the model's task in this network's config
                model_source="operator",  # the operator's engine loads it; validators check what it serves
                accelerator_type=reg.accelerator,
                capacity=reg.capacity,
                endpoint=endpoint,
                tls_name=name,
            )
            await self._call(self._registry.claim, spec, reg.nonce)  # before probing: a replay never probes
            await self._probe(spec.endpoint, reg.model, spec.tls_name)
            secret = secrets.token_urlsafe(32)
            await self._call(self._registry.join, spec, secret, reg.nonce)
        except RegistrationError as exc:
            raise _refused(exc) from None
        return {"node_id": reg.node_id, "operator": reg.operator, "model": reg.model, "secret": secret}

    async def leave(self, raw: Any) -> dict:
        try:
            reg = verify(parse_signed(raw), self.chain_id, self.network_id)
            if reg.action != "leave":
                raise RegistrationError(400, "this is a join; send it to /v1/nodes", "wrong_action")
            await self._call(self._registry.leave, reg.node_id, reg.operator, reg.nonce)
        except RegistrationError as exc:
            raise _refused(exc) from None
        return {"node_id": reg.node_id, "left": True}
