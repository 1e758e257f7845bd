"""The OpenAI-compatible gateway's request path (its HTTP app and Serve deployment: routing/app.py).

One request: parse and validate with vLLM's protocol models (through ray.serve.llm) -> choose a
live node (in-process, from a snapshot refreshed in the background) -> call the node (a managed
node's LLMServer by Serve handle, an open node over HTTP: cluster/nodes.py) -> pass chunks through
as they come -> write one usage record durably -> tell the client the request completed.

A node that fails before the first byte reaches the client is reported to the router and the
request is retried on another node; after the first byte, the stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.responses import Response, StreamingResponse

from cluster.completions import NodeError, parse_body
from cluster.nodes import NodeDirectory
from cluster.records import NodeStats, QualityScores, UsageRecord, keyed_sample
from routing import errors, intake, metrics
from routing.admission import Admission
from routing.intake import IntakeLimits
from routing.keys import ClientKey, KeyRing, key_from_secret
from routing.metering import MeteredModel, Tally, TokenCounter, metered, observe
from routing.selection import NodeSelector, facts_for
from routing.shadow import Capture, strip_token_ids, verifiable
from routing.timeouts import Timeouts

log = logging.getLogger("meritnet.gateway")

DONE = "data: [DONE]\n\n"
SEED_BOUND = 2**63  # vLLM takes any int64 seed
_REMOTE_TIMEOUT_S = 10.0  # every background call to another actor is bounded by this
_SCRAPE_TIMEOUT_S = 2.0  # /metrics waits this long for another actor's metrics
_ABSENT_RETRY_S = 5.0  # validators start after the gateway: their actors appear within seconds


class GatewayConfig(BaseModel):
    """Settings of the gateway deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry_name: str = Field(default="meritnet-registry", description="Name of the node registry actor.")
    usage_sink_name: str | None = Field(
        default="meritnet-usage", description="Name of the Ray actor that stores usage records durably."
    )
    consensus_name: str = Field(
        default="meritnet-consensus",
        description="Named actor whose latest() gives the consensus QualityScores (absent: all nodes unscored).",
    )
    namespace: str = Field(default="meritnet", description="Ray namespace of the registry and the sink.")
    refresh_interval_s: float = Field(
        default=0.5, gt=0, description="How often the local node snapshot is refreshed from the registry."
    )
    max_attempts: int = Field(default=3, ge=1, le=10, description="Nodes tried per request before giving up.")
    timeouts: Timeouts = Field(
        default_factory=lambda: Timeouts(), description="How long a node may take (first byte, gaps, total)."
    )
    router_config: str | None = Field(
        default=None, description="Path of the routing profile YAML; None uses deploy/profiles/default.yaml."
    )
    api_keys: tuple[SecretStr, ...] = Field(
        default=(),
        description="Bearer keys from config (unlimited); with none here and none in keys_file "
        "the endpoint is open (local use).",
    )
    cors_origins: tuple[str, ...] = Field(
        default=(), description="Origins allowed to call the endpoint from a browser (CORS); none by default."
    )
    keys_file: str | None = Field(
        default=None,
        description="The key store of `meritnet keys` (hashed keys with limits), re-read on change.",
    )
    challenge_keys: tuple[SecretStr, ...] = Field(
        default=(), description="Keys validators use to target a node with the 'x-meritnet-node' header."
    )
    capture_token_ids: bool = Field(
        default=True,
        description="Ask every node for its token ids (stripped for clients that did not ask), "
        "so challenges and shadow-verified requests look like all others to a node.",
    )
    shadow_feed_name: str = Field(
        default="meritnet-shadow",
        description="Named actor that takes organic completions for shadow verification (absent: none offered).",
    )
    shadow_rate: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Share of verifiable organic requests offered to validators.",
    )
    intake: IntakeLimits = Field(
        default_factory=IntakeLimits, description="Body size, nesting and parameter caps of one request."
    )
    metered_models: dict[str, MeteredModel] = Field(
        default_factory=dict,
        description="model id -> its tokenizer, so the gateway counts prompt and completion tokens itself "
        "(routing/metering.py). A model without one is metered from the node's ids and clamped report.",
    )
    settlement_name: str = Field(
        default="meritnet-settlement",
        description="Named settlement actor (operators' rewards; absent: none).",
    )
    chain_id: int = Field(
        default=0,
        ge=0,
        description="Chain id of the network's settlement chain: open nodes sign registrations for it.",
    )
    network_id: str = Field(
        default_factory=lambda: "0x" + secrets.token_hex(32),
        pattern=r"^0x[0-9a-f]{64}$",
        description="The network's id, the salt of open nodes' registrations (deploy keeps it in state.json).",
    )
    admit_open_nodes: bool = Field(
        default=True,
        description="Accept signed registrations of open nodes at POST /v1/nodes (routing/admission.py).",
    )
    shadow_key: SecretStr = Field(
        default_factory=lambda: SecretStr(secrets.token_hex(16)),
        description="Key of the shadow sample's hash (random per gateway unless set); nodes never see it.",
    )


def _is_event(message: Any) -> bool:
    """A stream event (`data: ...`) rather than a whole JSON body; anything but text raises."""
    if not isinstance(message, str):
        raise TypeError(f"a node sent a {type(message).__name__}, not text")
    return message.startswith("data: ")


def _engine_error(error: NodeError) -> errors.APIError:
    code = error.code if isinstance(error.code, int) else 500  # the node's own failure when unclear
    return errors.from_engine_error(error.message, code, error.type)


def _one_of(secret: str, accepted: set[str]) -> bool:
    """Constant-time membership (no timing hint about how much of a key matched)."""
    return bool(secret) and any(hmac.compare_digest(secret.encode(), k.encode()) for k in accepted)


def _first_of(item: Any) -> Any:
    """ray.serve.llm yields lists of chunks when streaming (its batcher), objects otherwise."""
    if isinstance(item, list):
        return item[0] if item else None
    return item


class GatewayCore:
    """The gateway's logic, independent of how it is hosted (Serve ingress or a test harness)."""

    def __init__(
        self, config: GatewayConfig, selector: NodeSelector, handle_for, sink, registry=None, counters=None
    ):
        self.config = config
        # model id -> TokenCounter; loaded here (once per replica) unless given (unit tests)
        self._counters = (
            counters
            if counters is not None
            else {m: TokenCounter.load(spec) for m, spec in config.metered_models.items()}
        )
        self.selector = selector
        # managed nodes by Serve handle (`handle_for(node_id)`), open nodes over HTTP (registry links)
        self.nodes = NodeDirectory(handle_for)
        self._sink = sink  # Ray actor handle with record.remote(list[UsageRecord])
        self._registry = registry
        self.admission = (
            Admission(registry, config.chain_id, config.network_id, set(config.metered_models))
            if registry is not None and config.admit_open_nodes
            else None
        )
        self._nodes: dict[str, NodeStats] = {}
        self._in_flight: Counter[str] = Counter()
        self._refresher: asyncio.Task | None = None
        self._consensus = None
        self._shadow_feed = None
        self._absent_until: dict[str, float] = {}  # actor name -> when to look it up again
        self._shadow_key = config.shadow_key.get_secret_value().encode()
        self._quality_epoch: int | None = None
        self._scores: QualityScores | None = None  # the latest consensus, for /status
        self._served: Counter[str] = Counter()  # completed requests per node through this replica
        self._scraped: dict[str, str] = {}  # actor name -> its last metrics text (GET /metrics)
        self._gateway_id = uuid.uuid4().hex[:12]
        self.keys = KeyRing(
            [key_from_secret(k.get_secret_value()) for k in config.api_keys],
            Path(config.keys_file) if config.keys_file else None,
        )
        self._challenge_keys = {k.get_secret_value() for k in config.challenge_keys}

    # ---- background snapshot -------------------------------------------------------------
    def set_nodes(self, stats: list[NodeStats]) -> None:
        self._nodes = {s.node_id: s for s in stats}
        self.selector.update_nodes(stats)

    async def refresh_once(self) -> None:
        self.keys.reload()
        if self._registry is None:
            return
        # bounded: a stuck registry must not stall the refresher (the last snapshot keeps serving)
        stats: list[NodeStats] = await asyncio.wait_for(self._registry.snapshot.remote(), _REMOTE_TIMEOUT_S)
        self.nodes.set_links(await asyncio.wait_for(self._registry.links.remote(), _REMOTE_TIMEOUT_S))
        self.set_nodes(stats)
        await self._refresh_quality()
        if self._shadow_feed is None and self.config.shadow_rate > 0:
            self._shadow_feed = await self._named_actor(self.config.shadow_feed_name)
        models = Counter(s.model_id for s in stats if s.live)
        for model in {s.model_id for s in stats}:
            metrics.LIVE_NODES.labels(model).set(models.get(model, 0))
        self._registry.report_load.remote(self._gateway_id, dict(self._in_flight))

    async def _refresh_quality(self) -> None:
        """Pull the validators' consensus scores, if a consensus actor runs (background only)."""
        if self._consensus is None:
            self._consensus = await self._named_actor(self.config.consensus_name)
            if self._consensus is None:
                return  # no validators in this network: every node stays unscored
        scores: QualityScores | None = await asyncio.wait_for(
            self._consensus.latest.remote(), _REMOTE_TIMEOUT_S
        )
        if scores is not None and scores.epoch != self._quality_epoch:
            self.selector.update_quality(scores)
            self._quality_epoch, self._scores = scores.epoch, scores

    async def _named_actor(self, name: str):
        """The named actor, or None while it does not exist (validators are optional). An absent actor
        is looked up again only every `_ABSENT_RETRY_S`, not on every refresh."""
        import ray

        now = time.monotonic()
        if now < self._absent_until.get(name, 0.0):
            return None
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(ray.get_actor, name, namespace=self.config.namespace), _REMOTE_TIMEOUT_S
            )
        except ValueError:
            self._absent_until[name] = now + _ABSENT_RETRY_S
            return None

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh_once()
            except Exception as exc:  # noqa: BLE001 - registry restarting: keep serving from the last snapshot
                log.warning(
                    "gateway: node snapshot refresh failed (%s); using the last one", type(exc).__name__
                )
            await asyncio.sleep(self.config.refresh_interval_s)

    async def ensure_started(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
            try:
                await self.refresh_once()
            except Exception as exc:  # noqa: BLE001 - the background refresher retries
                log.info("gateway: first node snapshot not ready (%s)", type(exc).__name__)

    # ---- request entry points ------------------------------------------------------------
    def check_auth(self, request: Request) -> ClientKey | None:
        """The client's key (None when the endpoint is open, or for a validator's challenge key:
        validators are not clients, and with keys required their challenges must still get through, or
        every node would score 0). A missing, unknown or revoked key is a 401."""
        if _one_of(request.headers.get("x-meritnet-challenge-key", ""), self._challenge_keys):
            return None
        return self.keys.authenticate(request.headers.get("authorization", ""))

    def admit(self, key: ClientKey | None, model: str) -> None:
        """The key's model allow-list (403) and rate limits (429 with Retry-After)."""
        self.keys.admit(key, model)

    def models(self) -> dict:
        live = sorted({s.model_id for s in self._nodes.values() if s.live})
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "meritnet"} for m in live],
        }

    async def parse(self, request: Request, request_cls: type[BaseModel]) -> BaseModel:
        """The validated request, or an OpenAI-shaped 4xx (routing/intake.py)."""
        return intake.validate(
            await intake.read_json(request, self.config.intake), request_cls, self.config.intake
        )

    async def operator_view(self, address: str) -> dict:
        """GET /v1/operators/{address}: the operator's nodes and rewards (the settlement actor's view)."""
        from eth_utils import is_checksum_address

        if not is_checksum_address(address):
            raise errors.APIError(
                400, f"{address[:64]!r} is not an EIP-55 checksummed address", param="address"
            )
        nodes = [s.model_dump(exclude={"in_flight"}) for s in self._nodes.values() if s.operator == address]
        settlement = await self._named_actor(self.config.settlement_name)
        rewards = None
        if settlement is not None:
            rewards = await asyncio.wait_for(settlement.rewards_of.remote(address), _REMOTE_TIMEOUT_S)
        return {"operator": address, "nodes": nodes, "rewards": rewards}

    async def metrics_text(self) -> str:
        """GET /metrics: this replica's metrics, then the consensus actor's (scoring gauges) and the
        settlement actor's, each asked with a short bound; an actor that does not answer keeps its last
        text, so one scrape target shows the whole control plane."""
        from prometheus_client import generate_latest

        parts = [generate_latest(metrics.REGISTRY).decode()]
        for name in (self.config.consensus_name, self.config.settlement_name):
            actor = None if self._registry is None else await self._named_actor(name)
            if actor is not None:
                try:
                    text = await asyncio.wait_for(actor.metrics_text.remote(), _SCRAPE_TIMEOUT_S)
                    self._scraped[name] = text if isinstance(text, str) else ""
                except Exception as exc:  # noqa: BLE001 - its last text serves; the scrape must not fail
                    log.warning("%s did not answer for /metrics (%s)", name, type(exc).__name__)
            parts.append(self._scraped.get(name, ""))
        return "".join(parts)

    async def status_view(self, epochs: int = 10) -> dict:
        """What `/status` shows: every node (with consensus quality, share of this replica's completed
        requests and TTFT average) and the last `epochs` settled epochs."""
        total = sum(self._served.values()) or 1
        quality = self._scores.quality if self._scores is not None else {}
        nodes = []
        for s in sorted(self._nodes.values(), key=lambda s: s.node_id):
            health = self.selector.router.health.nodes.get(s.node_id)  # read only: never creates state
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
                    "share": self._served[s.node_id] / total,
                    "ttft_ms": None if ttft is None else 1000 * ttft,
                }
            )
        recent: list[dict] | None = []
        settlement = None if self._registry is None else await self._named_actor(self.config.settlement_name)
        if settlement is not None:
            try:
                recent = await asyncio.wait_for(settlement.recent_epochs.remote(epochs), _REMOTE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the page still shows the nodes
                log.warning("settlement did not answer for /status (%s)", type(exc).__name__)
                recent = None
        return {"nodes": nodes, "epochs": recent, "settlement": settlement is not None}

    def _target_node(self, request: Request) -> str | None:
        """Validators may pin a challenge to one node; only with a challenge key."""
        node = request.headers.get("x-meritnet-node")
        if node is None:
            return None
        auth = request.headers.get("x-meritnet-challenge-key", "")
        if not _one_of(auth, self._challenge_keys):
            raise errors.APIError(
                403,
                "x-meritnet-node requires a valid x-meritnet-challenge-key.",
                type="permission_error",
                code="forbidden",
            )
        return node

    async def handle(
        self, request: Request, body: Any, method: str, key: ClientKey | None = None
    ) -> Response:
        """Route `body` (a validated Chat/CompletionRequest) to a node and answer the client."""
        started = time.time()
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex
        model = body.model
        known = {s.model_id for s in self._nodes.values()}
        if model not in known:
            raise errors.unknown_model(model, sorted(known))
        pinned = self._target_node(request)
        stream = bool(getattr(body, "stream", False))
        if body.seed is None:  # every request carries a seed, so a seed tells a node nothing
            body.seed = secrets.randbelow(SEED_BOUND)
        capture = None
        if (
            pinned is None
            and self._shadow_feed is not None
            and keyed_sample(self._shadow_key, rid, self.config.shadow_rate)
            and verifiable(body)
        ):
            capture = Capture(rid, body)
        strip_ids = self.config.capture_token_ids and not body.return_token_ids
        if self.config.capture_token_ids:
            body.return_token_ids = True  # every request alike to the node; stripped below if unasked
        client_wants_usage = bool(stream and body.stream_options and body.stream_options.include_usage)
        if stream:
            # Always ask the node for usage so metering is exact; strip it if the client did not ask.
            from vllm.entrypoints.openai.chat_completion.protocol import StreamOptions

            body.stream_options = StreamOptions(include_usage=True)
        body.request_id = rid
        facts = facts_for(body, request.headers, target_node=pinned)

        tried: set[str] = set()
        last_error: errors.APIError | None = None
        asked = intake.int_field(body, "max_completion_tokens") or intake.int_field(body, "max_tokens")
        allowed = self.config.timeouts.total_s(asked, intake.int_field(body, "n") or 1)
        deadline = t0 + allowed
        for attempt in range(self.config.max_attempts):
            if time.perf_counter() >= deadline:
                raise errors.timed_out(allowed)
            node = self.selector.pick(facts, exclude=tried)
            if node is None:
                break
            tried.add(node.node_id)
            stats = self._nodes.get(node.node_id)
            client = self.nodes.client(node.node_id, open_node=stats is not None and stats.kind == "open")
            gen = client.call(method, body)
            self._begin(node.node_id)
            ctx = _Ctx(rid, node, body, started, t0, client_wants_usage, strip_ids, capture)
            ctx.counter, ctx.key, ctx.deadline = self._counters.get(model), key, deadline
            try:
                first = await self._first_message(
                    gen,
                    node.node_id,
                    facts,
                    tried,
                    last=attempt == self.config.max_attempts - 1,
                    deadline=deadline,
                    stream=stream,
                )
            except asyncio.CancelledError:  # the client went away while the node was working
                self._abandon(ctx, gen)
                raise
            except Exception as exc:  # noqa: BLE001 - any node failure moves the request to another node
                self._end(node.node_id)
                self.selector.observe_failure(node.node_id)
                metrics.RETRIES.labels(model, node.node_id).inc()
                log.warning(
                    "node %s failed before the first byte (%s); trying another",
                    node.node_id,
                    type(exc).__name__,
                )
                try:
                    gen.cancel()
                except Exception as exc:  # noqa: BLE001 - the node is being abandoned anyway
                    log.debug("cancel of an abandoned node stream failed (%s)", type(exc).__name__)
                continue
            head = _first_of(first)
            try:
                parsed = None if _is_event(head) else parse_body(head)  # a whole answer, or an error
            except (ValidationError, ValueError, TypeError) as exc:  # neither: not a completion
                self._end(node.node_id)
                self._node_malformed(node.node_id, exc)
                last_error = errors.upstream_failed(model)
                continue
            if parsed is not None and parsed.error is not None:
                self._end(node.node_id)
                api_error = _engine_error(parsed.error)
                if api_error.status >= 500 or not client.vouched:  # the node's fault (or maybe): try another
                    self.selector.observe_failure(node.node_id)
                    last_error = api_error
                    continue
                self.selector.observe_success(node.node_id, None, None)
                raise api_error
            if not stream:
                if parsed is None:  # an event where a whole answer belongs
                    self._end(node.node_id)
                    self._node_malformed(
                        node.node_id, ValueError("a stream event for a non-streamed request")
                    )
                    last_error = errors.upstream_failed(model)
                    continue
                ctx.tally.add(parsed)
                return await self._complete(ctx, head)
            return StreamingResponse(
                self._stream(ctx, first, gen),
                media_type="text/event-stream",
                headers={"x-meritnet-request-id": rid, "x-meritnet-node": node.node_id},
            )
        if not tried:
            raise errors.no_live_node(model)
        if time.perf_counter() >= deadline:
            raise errors.timed_out(allowed)
        raise last_error or errors.upstream_failed(model)

    def _abandon(self, ctx: _Ctx, gen) -> None:
        """A client disconnected before its answer: free the node, stop its work, keep one 'cancelled'
        record (written in the background: the request's own task is being cancelled)."""
        self._end(ctx.node.node_id)
        try:
            gen.cancel()
        except Exception as exc:  # noqa: BLE001 - the node is being abandoned anyway
            log.debug("cancel of an abandoned node stream failed (%s)", type(exc).__name__)
        asyncio.get_running_loop().create_task(self._meter_quietly(ctx, "cancelled"))

    async def _first_message(
        self, gen, node_id: str, facts, tried: set[str], last: bool, deadline: float, stream: bool = True
    ) -> Any:
        """The node's first message. Its adaptive timeout (a multiple of its usual TTFT) only serves to
        move the request to another node: when there is none to move to (last attempt, a pinned
        challenge, every other node tried or filtered out), a slow node is waited for up to
        `timeouts.first_byte_s` instead of turning an overloaded moment into a 503. A non-streamed
        answer's first message is the whole generation: only the request's total time limit applies to
        it (a TTFT-based timeout would ban a healthy node for a long answer and run the work twice)."""
        step = asyncio.ensure_future(gen.__anext__())
        try:
            remaining = max(0.0, deadline - time.perf_counter())
            limit = min(self.config.timeouts.first_byte_s, remaining) if stream else remaining
            adaptive = min(limit, self.selector.timeout_s(node_id)) if stream else limit
            done, _ = await asyncio.wait({step}, timeout=adaptive)
            if not done and adaptive < limit and (last or self.selector.pick(facts, exclude=tried) is None):
                done, _ = await asyncio.wait({step}, timeout=limit - adaptive)
            if not done:
                raise TimeoutError(f"no first byte from {node_id}")
            return step.result()
        finally:
            if not step.done():
                step.cancel()

    # ---- response paths --------------------------------------------------------------------
    async def _complete(self, ctx: _Ctx, payload: str) -> Response:
        try:
            ttft = time.perf_counter() - ctx.t0
            ctx.count()
            payload = _with_usage(payload, ctx)  # the client sees what it is billed, not the node's claim
            if ctx.strip_ids:
                payload = strip_token_ids(payload)
            ctx.digest.update(payload.encode())
            ctx.ttft = ttft
            await self._meter(ctx, "ok")
            # Without a stream there is no first-token time: time per token is the whole time
            # spread over the tokens, used for both EWMAs so the latency prediction stays coherent.
            per_token = ttft / max(1, ctx.completion_tokens)
            self.selector.observe_success(ctx.node.node_id, per_token, per_token)
        finally:
            self._end(ctx.node.node_id)
        return Response(
            payload,
            media_type="application/json",
            headers={"x-meritnet-request-id": ctx.rid, "x-meritnet-node": ctx.node.node_id},
        )

    async def _stream(self, ctx: _Ctx, first: Any, gen) -> AsyncIterator[str]:
        status = "cancelled"
        itl, sent_at = metrics.ITL.labels(ctx.model, ctx.node.node_id), 0.0
        try:
            async for chunk in _chain(first, gen, self.config.timeouts.stream_idle_s, ctx.deadline):
                out: list[str] = []  # one message downstream per message from the node
                for piece in chunk if isinstance(chunk, list) else [chunk]:
                    if not _is_event(piece):  # an ErrorResponse mid-stream (or garbage: raises)
                        error = parse_body(piece).error
                        if error is None:
                            raise ValueError("not a stream event")
                        out.append(_engine_error(error).sse_event().decode())
                        status = "error"
                        break
                    if piece.startswith(DONE[:12]):
                        continue  # sent after the usage record is durable
                    if not piece.startswith("data: {"):
                        raise ValueError("not a data event")
                    parsed = parse_body(piece[6:])
                    if parsed.error is not None:  # an open node's error event (HTTP carries it as data)
                        out.append(_engine_error(parsed.error).sse_event().decode())
                        status = "error"
                        break
                    ctx.tally.add(parsed)
                    if not parsed.choices and parsed.usage is not None:  # the node's usage chunk
                        if not ctx.client_wants_usage:
                            continue
                        ctx.count()
                        piece = "data: " + _with_usage(piece[6:], ctx) + "\n\n"
                    out.append(strip_token_ids(piece) if ctx.strip_ids else piece)
                if out:
                    now = time.perf_counter()
                    if ctx.ttft is None:
                        ctx.ttft = now - ctx.t0
                    else:
                        itl.observe(now - sent_at)
                    sent_at = now
                    text = "".join(out)
                    ctx.digest.update(text.encode())
                    yield text
                if status == "error":
                    return
            status = "ok"
            ctx.count()
            await self._meter(ctx, "ok")
            self.selector.observe_success(ctx.node.node_id, ctx.ttft, _tpot(ctx))
            yield DONE
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - a node's failure mid-stream must not crash the gateway
            status = "error"
            if isinstance(exc, ValueError):  # includes ValidationError: output that is not a completion
                self._node_malformed(ctx.node.node_id, exc)
            else:
                self.selector.observe_failure(ctx.node.node_id)
                log.warning("node %s failed mid-stream (%s)", ctx.node.node_id, type(exc).__name__)
            late = time.perf_counter() >= ctx.deadline
            error = errors.timed_out(ctx.deadline - ctx.t0) if late else errors.stream_interrupted()
            yield error.sse_event().decode()
        finally:
            self._end(ctx.node.node_id)
            if status != "ok":
                gen.cancel()
                # Not acknowledged as completed, but metered for audit; never blocks the client.
                asyncio.get_running_loop().create_task(self._meter_quietly(ctx, status))

    async def _meter(self, ctx: _Ctx, status: str) -> None:
        if status != "ok":
            ctx.count()  # what was forwarded before the failure (audit only: not an ok record)
        observe(ctx.node.node_id, ctx.tally, ctx.prompt_tokens, ctx.completion_tokens, ctx.counted)
        if ctx.key is not None:  # per key: requests by outcome, tokens against its limit
            metrics.KEY_REQUESTS.labels(ctx.key.key_id, status).inc()
            metrics.KEY_TOKENS.labels(ctx.key.key_id).inc(ctx.prompt_tokens + ctx.completion_tokens)
            self.keys.limiter.charge_tokens(ctx.key, ctx.prompt_tokens + ctx.completion_tokens)
        rec = ctx.record(status)
        if status == "ok":
            self._served[ctx.node.node_id] += 1
        metrics.REQUESTS.labels(ctx.model, ctx.node.node_id, status).inc()
        metrics.E2E.labels(ctx.model, ctx.node.node_id).observe(time.perf_counter() - ctx.t0)
        if ctx.ttft is not None:
            metrics.TTFT.labels(ctx.model, ctx.node.node_id).observe(ctx.ttft)
        metrics.TOKENS.labels(ctx.model, ctx.node.node_id, "prompt").inc(rec.prompt_tokens)
        metrics.TOKENS.labels(ctx.model, ctx.node.node_id, "completion").inc(rec.completion_tokens)
        if status == "ok" and ctx.capture is not None:
            self._offer_for_shadow(ctx)
        if self._sink is None:
            return
        for attempt in range(5):  # 0.2 + 0.4 + 0.8 + 1.6 s: long enough for the store to restart
            try:
                await asyncio.wait_for(self._sink.record.remote([rec]), 10)
                return
            except Exception as exc:  # noqa: BLE001 - retried, then a clear 503
                log.error("usage sink write failed (attempt %d: %s)", attempt + 1, type(exc).__name__)
                if attempt < 4:
                    await asyncio.sleep(0.2 * 2**attempt)
        raise errors.APIError(
            503,
            "The request ran but its usage could not be recorded; it is not billed. Retry shortly.",
            type="service_unavailable",
            code="metering_unavailable",
        )

    def _node_malformed(self, node_id: str, exc: Exception) -> None:
        """A node sent something that is not a completion: penalised like a failure, counted."""
        self.selector.observe_failure(node_id)
        metrics.MALFORMED.labels(node_id).inc()
        log.warning("node %s sent a malformed answer (%s)", node_id, type(exc).__name__)

    def _offer_for_shadow(self, ctx: _Ctx) -> None:
        """Hand a sampled organic completion to validators; fire-and-forget, never fails the request."""
        try:
            claimed = ctx.tally.reported.completion_tokens if ctx.tally.reported else ctx.completion_tokens
            item = ctx.capture.served(ctx.node.node_id, ctx.tally, claimed)
            self._shadow_feed.offer.remote([item])
            metrics.SHADOW_OFFERED.labels(ctx.model, ctx.node.node_id).inc()
        except Exception as exc:  # noqa: BLE001 - content is never logged, only the failure kind
            log.warning("shadow offer of %s failed (%s)", ctx.rid, type(exc).__name__)

    async def _meter_quietly(self, ctx: _Ctx, status: str) -> None:
        try:
            await self._meter(ctx, status)
        except Exception as exc:  # noqa: BLE001 - the client's stream already ended; _meter logged it
            log.debug("metering after the stream failed (%s)", type(exc).__name__)

    def _begin(self, node_id: str) -> None:
        self._in_flight[node_id] += 1
        self.selector.begin(node_id)
        metrics.IN_FLIGHT.labels(node_id).set(self._in_flight[node_id])

    def _end(self, node_id: str) -> None:
        self._in_flight[node_id] = max(0, self._in_flight[node_id] - 1)
        self.selector.end(node_id)
        metrics.IN_FLIGHT.labels(node_id).set(self._in_flight[node_id])


class _Ctx:
    """Everything one in-flight request accumulates for its usage record."""

    __slots__ = (
        "body",
        "capture",
        "client_wants_usage",
        "completion_tokens",
        "counted",
        "counter",
        "deadline",
        "digest",
        "key",
        "model",
        "node",
        "prompt_tokens",
        "rid",
        "started",
        "strip_ids",
        "t0",
        "tally",
        "ttft",
    )

    def __init__(self, rid, node, body, started, t0, client_wants_usage, strip_ids=False, capture=None):
        self.rid, self.node, self.body, self.model = rid, node, body, body.model
        self.started, self.t0, self.client_wants_usage = started, t0, client_wants_usage
        self.strip_ids, self.capture = strip_ids, capture
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft: float | None = None
        self.digest = hashlib.sha256()
        self.tally = Tally()
        self.counter: TokenCounter | None = None
        self.counted = False
        self.key: ClientKey | None = None
        self.deadline = float("inf")

    def count(self) -> None:
        """The gateway's own token counts of what was forwarded so far (routing/metering.py)."""
        self.prompt_tokens, self.completion_tokens, self.counted = metered(
            self.body, self.tally, self.counter
        )

    def record(self, status: str) -> UsageRecord:
        return UsageRecord(
            request_id=self.rid,
            node_id=self.node.node_id,
            operator=self.node.operator,
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            started_at=self.started,
            ttft_s=self.ttft,
            ended_at=self.started + (time.perf_counter() - self.t0),
            status=status,
            key_id=self.key.key_id if self.key is not None else "",
            response_hash=self.digest.hexdigest(),
        )


def _with_usage(data: str, ctx: _Ctx) -> str:
    """A node's JSON body (or stream chunk) with its usage replaced by the gateway's counts."""
    obj = json.loads(data)
    obj["usage"] = {
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "total_tokens": ctx.prompt_tokens + ctx.completion_tokens,
    }
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _tpot(ctx: _Ctx) -> float | None:
    if ctx.ttft is None or ctx.completion_tokens <= 1:
        return None
    return (time.perf_counter() - ctx.t0 - ctx.ttft) / (ctx.completion_tokens - 1)


async def _chain(first, gen, idle_timeout_s: float, deadline: float):
    """The node's messages, the first one already received; a node silent for `idle_timeout_s` in the
    middle of a stream, or still sending at the request's `deadline` (perf_counter), raises TimeoutError
    (the client gets a clean error event, not a hang)."""
    yield first
    while True:
        wait = min(idle_timeout_s, deadline - time.perf_counter())
        if wait <= 0:
            raise TimeoutError("the request's total time limit passed")
        try:
            item = await asyncio.wait_for(gen.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the client left: this task is being cancelled
                raise
            raise ConnectionError("the node's stream was cancelled (its replica died)") from None
        yield item
