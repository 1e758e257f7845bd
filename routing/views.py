"""The gateway's read-only pages: the model catalogue (`/v1/models`), `/status` and `/status.json`,
`/metrics`, `/v1/operators/{address}` and its `/proof`.

They show the registry's node snapshot (already in the replica) and answers of control-plane actors
(settlement, consensus). Those actors are single-threaded, and the settler's `tick` may wait on a
transaction receipt, so a page never queues a call per client request (issue 28): every actor answer
goes through an `ActorCache`, which

- reuses an answer for `ttl_s`, then serves it stale while one refresh runs;
- has at most one call in flight per key and one per actor from this replica (a flood of distinct
  keys waits here, in the replica, not in the actor's queue);
- refuses with 503 beyond `max_pending` waiting refreshes, and bounds what it keeps (`max_keys`).

So the settlement actor sees at most one public call per gateway replica at a time, whatever the
clients send, and a page answers from memory while the actor is busy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from routing import errors

if TYPE_CHECKING:
    from routing.gateway import GatewayCore

log = logging.getLogger("meritnet.gateway")

_REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # the gateway's request ids (uuid4 hex)
_CALL_TIMEOUT_S = 10.0  # one actor call for a page
_SCRAPE_TIMEOUT_S = 2.0  # /metrics waits this long for another actor's metrics


@dataclass
class _Entry:
    value: Any = None
    at: float = -float("inf")  # monotonic time of the answer; -inf: none yet
    refresh: asyncio.Task | None = None


class ActorCache:
    """Bounded, single-flight answers of one actor (see the module docstring). `fetch()` makes the call;
    an exception leaves the last answer in place (and reaches a caller that has none)."""

    def __init__(
        self,
        ttl_s: float,
        *,
        timeout_s: float = _CALL_TIMEOUT_S,
        max_keys: int = 1024,
        max_pending: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.timeout_s, self.max_keys, self.max_pending = ttl_s, timeout_s, max_keys, max_pending
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._one_call = asyncio.Semaphore(1)
        self.calls = 0  # actor calls made (tests and logs)

    def _pending(self) -> int:
        return sum(1 for e in self._entries.values() if e.refresh is not None and not e.refresh.done())

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[Any]]) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            self._evict()
        self._entries.move_to_end(key)
        fresh = self._clock() - entry.at < self.ttl_s
        if not fresh and (entry.refresh is None or entry.refresh.done()):
            if self._pending() >= self.max_pending:
                if entry.at > -float("inf"):
                    return entry.value  # busy: the stale answer serves
                raise errors.APIError(
                    503,
                    "The network is busy answering other pages; retry in a few seconds.",
                    type="server_error",
                    code="busy",
                )
            entry.refresh = asyncio.get_running_loop().create_task(self._refresh(entry, fetch))
        if entry.at > -float("inf"):
            return entry.value  # fresh, or stale while its refresh runs
        assert entry.refresh is not None
        await asyncio.shield(entry.refresh)  # the first answer: wait for it (bounded by timeout_s)
        if entry.at == -float("inf"):
            raise errors.APIError(
                503, "The network's control plane did not answer; retry shortly.", code="busy"
            )
        return entry.value

    async def _refresh(self, entry: _Entry, fetch: Callable[[], Awaitable[Any]]) -> None:
        async with self._one_call:
            self.calls += 1
            try:
                entry.value = await asyncio.wait_for(fetch(), self.timeout_s)
                entry.at = self._clock()
            except Exception as exc:  # noqa: BLE001 - the last answer keeps serving; callers see 503
                log.warning(
                    "gateway: a page's actor call failed (%s); the last answer serves", type(exc).__name__
                )

    def _evict(self) -> None:
        """Forget the least recently asked keys beyond `max_keys`, except those a refresh is running for
        (somebody waits on it): at most max_keys + max_pending entries."""
        extra = len(self._entries) - self.max_keys
        for key in [k for k, e in self._entries.items() if e.refresh is None or e.refresh.done()][
            : max(0, extra)
        ]:
            del self._entries[key]


def _checksummed(address: str) -> str:
    from eth_utils import is_checksum_address

    if not is_checksum_address(address):
        raise errors.APIError(400, f"{address[:64]!r} is not an EIP-55 checksummed address", param="address")
    return address


# What a model's nodes serve, by their task (cluster/records.py NodeTask): generation nodes run vLLM's
# structured output and tool parser (cluster/deployment.py EngineDefaults), embedding nodes pool.
CAPABILITIES = {
    "generate": ("chat", "completions", "tools", "json_schema"),
    "embed": ("embeddings",),
}


class PublicViews:
    """The read-only pages of one gateway replica, over its core's snapshot and cached actor answers."""

    def __init__(self, core: GatewayCore, *, ttl_s: float = 2.0) -> None:
        self._core = core
        self.settlement = ActorCache(ttl_s)
        self.scrapes = ActorCache(ttl_s, timeout_s=_SCRAPE_TIMEOUT_S)

    def models(self) -> dict:
        """GET /v1/models: every model a live node serves, with what a client scanning models reads."""
        live = sorted({s.model_id for s in self._core._nodes.values() if s.live})
        return {"object": "list", "data": [self.model(m) for m in live]}

    def model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: one catalogue entry (OpenAI's fields, then meritnet's): the context
        length (the gateway's own tokenizer config, None if the model is not metered here), the routes
        it serves, and how many live nodes serve it; an OpenAI-shaped 404 for a model no node serves."""
        nodes = [s for s in self._core._nodes.values() if s.model_id == model_id and s.live]
        if not nodes:
            raise errors.unknown_model(
                model_id, sorted({s.model_id for s in self._core._nodes.values() if s.live})
            )
        metered = self._core.config.metered_models.get(model_id)
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": "meritnet",
            "context_length": metered.max_model_len if metered is not None else None,
            "capabilities": sorted({c for s in nodes for c in CAPABILITIES[s.task]}),
            "nodes": len(nodes),
            "pricing": price.model_dump() if (price := self._core.config.pricing.get(model_id)) else None,
        }

    async def _settlement(self):
        core = self._core
        return (
            None if core._registry is None else await core.refresher.named_actor(core.config.settlement_name)
        )

    async def operator(self, address: str) -> dict:
        """GET /v1/operators/{address}: the operator's nodes and rewards (the settlement actor's view)."""
        address = _checksummed(address)
        nodes = [
            s.model_dump(exclude={"in_flight"}) for s in self._core._nodes.values() if s.operator == address
        ]
        actor, rewards = await self._settlement(), None
        if actor is not None:
            rewards = await self.settlement.get(
                ("rewards", address), lambda: actor.rewards_of.remote(address)
            )
        return {"operator": address, "nodes": nodes, "rewards": rewards}

    async def proof(self, address: str) -> dict:
        """GET /v1/operators/{address}/proof: the account's latest cumulative reward leaf, its proof, root,
        epoch, contract and chain id (the settlement actor builds it from the last settled epoch)."""
        address = _checksummed(address)
        actor = await self._settlement()
        prove = getattr(actor, "reward_proof_of", None) if actor is not None else None
        if prove is None:
            raise errors.APIError(
                404, "this network serves no reward proofs (no settlement)", code="no_settlement"
            )
        answer = await self.settlement.get(("proof", address), lambda: prove.remote(address))
        if answer.get("error"):
            raise errors.APIError(404, answer["error"], param="address", code="no_reward")
        return answer

    async def receipt(self, request_id: str) -> dict:
        """GET /v1/receipts/{request_id}: the request's usage leaf and its Merkle proof under the usage
        root on-chain (once its epoch settled), or where it stands; an OpenAI-shaped 404 for an id the
        network never billed."""
        if not _REQUEST_ID.fullmatch(request_id):
            raise errors.APIError(
                400, "a request id is the x-meritnet-request-id header's value", param="request_id"
            )
        actor = await self._settlement()
        receipt_of = getattr(actor, "receipt_of", None) if actor is not None else None
        if receipt_of is None:
            raise errors.APIError(404, "this network keeps no receipts (no settlement)", code="no_settlement")
        answer = await self.settlement.get(("receipt", request_id), lambda: receipt_of.remote(request_id))
        if answer.get("error"):
            raise errors.APIError(404, answer["error"], param="request_id", code="no_receipt")
        return answer

    async def metrics_text(self) -> str:
        """GET /metrics: this replica's metrics, then the consensus actor's (scoring gauges) and the
        settlement actor's; an actor that does not answer keeps its last text, so one scrape target
        shows the whole control plane."""
        from prometheus_client import generate_latest

        from routing import metrics

        core = self._core
        parts = [generate_latest(metrics.REGISTRY).decode()]
        for name in (core.config.consensus_name, core.config.settlement_name):
            actor = None if core._registry is None else await core.refresher.named_actor(name)
            text = ""
            if actor is not None:
                try:
                    text = await self.scrapes.get(name, lambda a=actor: a.metrics_text.remote())
                except errors.APIError:  # no answer yet: the scrape must not fail
                    log.warning("%s did not answer for /metrics", name)
            parts.append(text if isinstance(text, str) else "")
        return "".join(parts)

    async def status(self, epochs: int = 10) -> dict:
        """What `/status` shows: every node (with consensus quality, share of this replica's completed
        requests and TTFT average) and the last `epochs` settled epochs."""
        core = self._core
        total = sum(core.recorder.served.values()) or 1
        quality = core.refresher.scores.quality if core.refresher.scores is not None else {}
        nodes = []
        for s in sorted(core._nodes.values(), key=lambda s: s.node_id):
            health = core.selector.router.health.nodes.get(s.node_id)  # read only: never creates state
            ttft = health.ttft_ewma_s if health is not None else None
            nodes.append(
                {
                    "node_id": s.node_id,
                    "model": s.model_id,
                    "accelerator": s.accelerator_type,
                    "kind": s.kind,
                    "operator": s.operator,
                    "live": s.live,
                    "quality": quality.get(s.node_id),
                    "share": core.recorder.served[s.node_id] / total,
                    "ttft_ms": None if ttft is None else 1000 * ttft,
                }
            )
        recent: list[dict] | None = []
        actor = await self._settlement()
        if actor is not None:
            try:
                recent = await self.settlement.get(
                    ("recent", epochs), lambda: actor.recent_epochs.remote(epochs)
                )
            except errors.APIError:  # the page still shows the nodes
                recent = None
        degraded = {  # models served in spite of a refusing filter in the last minute, and why
            model: {"filter": stage, "at": at}
            for model, (at, stage) in core.selector.degraded.items()
            if time.time() - at < 60
        }
        return {"nodes": nodes, "epochs": recent, "settlement": actor is not None, "degraded": degraded}
