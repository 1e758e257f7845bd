"""Admitting open nodes: the gateway's half of `meritnet node join` / `leave` / `list`.

    POST /v1/nodes         a signed join (cluster/registration.py) -> 201 with the node's secret
    POST /v1/nodes/leave   a signed leave by the node's operator   -> 200
    GET  /v1/nodes         every node: id, kind, operator, model, accelerator, live (no endpoints, no secrets)
    GET  /v1/nodes/domain  what to sign: EIP-712 domain name, version and chain id

Order of checks, cheapest first, so a refused message costs the network little: strict parse ->
signature, chain, network id and expiry -> the model is one the network can meter and verify -> nonce
and node id ownership (registry) -> the endpoint answers /health and lists the model in /v1/models
(bounded in time and size: cluster/probe.py) -> join (the registry checks the nonce again, atomically,
plus one node per endpoint and a cap on open nodes). Every refusal is an OpenAI-shaped 4xx saying why.

The probe only shows that the endpoint is up and configured for the model; whether its outputs really
come from that model is for the validators to find out, as for every node.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
from pydantic import ValidationError

from cluster.probe import ProbeFailed, get_bounded
from cluster.records import NodeSpec
from cluster.registration import DOMAIN_NAME, DOMAIN_VERSION, RegistrationError, SignedRegistration, verify
from cluster.registry import refusal_of
from routing import errors

PROBE_TIMEOUT_S = 5.0
PROBE_MAX_BYTES = 64 << 10  # a /v1/models answer larger than this is not a node's
_REMOTE_TIMEOUT_S = 10.0


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


async def probe(endpoint: str, model: str) -> None:
    """Raise RegistrationError unless `endpoint` answers /health and lists `model` in /v1/models."""
    headers = {"accept-encoding": "identity"}
    try:
        async with httpx.AsyncClient(
            timeout=PROBE_TIMEOUT_S, follow_redirects=False, headers=headers
        ) as client:
            health, _ = await get_bounded(client, f"{endpoint}/health", PROBE_MAX_BYTES, PROBE_TIMEOUT_S)
            if health != 200:
                raise RegistrationError(422, f"{endpoint}/health answered {health}", "unhealthy")
            _, data = await get_bounded(client, f"{endpoint}/v1/models", PROBE_MAX_BYTES, PROBE_TIMEOUT_S)
    except ProbeFailed as exc:
        raise RegistrationError(
            422,
            f"the endpoint did not answer a health probe ({exc}); is it reachable from the network?",
            "unreachable",
        ) from None
    try:
        served = {m["id"] for m in json.loads(data)["data"]}
    except (ValueError, KeyError, TypeError, RecursionError):
        raise RegistrationError(
            422, f"{endpoint}/v1/models is not an OpenAI model list", "bad_models"
        ) from None
    if not all(isinstance(m, str) for m in served):
        raise RegistrationError(422, f"{endpoint}/v1/models lists ids that are not strings", "bad_models")
    if model not in served:
        raise RegistrationError(
            422, f"the endpoint serves {sorted(served)[:8]}, not the claimed model {model!r}", "wrong_model"
        )


class Admission:
    """Join and leave against the registry actor; `models` are the ones this network meters."""

    def __init__(self, registry, chain_id: int, network_id: str, models: set[str]) -> None:
        self._registry = registry
        self.chain_id, self.network_id = chain_id, network_id
        self._models = models

    def domain(self) -> dict:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chain_id": self.chain_id,
            "network_id": self.network_id,
        }

    async def _call(self, method, *args):
        refusal_of(await asyncio.wait_for(method.remote(*args), _REMOTE_TIMEOUT_S))

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
            await self._call(self._registry.check, reg.node_id, reg.operator, reg.nonce)
            await probe(reg.endpoint, reg.model)
            spec = NodeSpec(
                node_id=reg.node_id,
                operator=reg.operator,
                model_id=reg.model,
                model_source="operator",  # the operator's engine loads it; validators check what it serves
                accelerator_type=reg.accelerator,
                capacity=reg.capacity,
                endpoint=reg.endpoint,
            )
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
