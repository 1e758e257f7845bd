"""The OpenAI-compatible gateway's request path (its HTTP app and Serve deployment: routing/app.py; one
request's plan, its per-node context and the relay of a node's stream: routing/request_context.py).

One request: parse and validate with vLLM's protocol models (through ray.serve.llm) -> choose a
live node (in-process, from a snapshot refreshed in the background) -> call the node (a managed
node's LLMServer by Serve handle, an open node over HTTP: cluster/nodes.py) -> pass chunks through
as they come -> write one usage record durably -> tell the client the request completed.

A node that fails before the first byte reaches the client is reported to the router and the
request is retried on another node; after the first byte, the stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response, StreamingResponse

from cluster import sse
from cluster.completions import NodeError, answer_byte_cap
from cluster.nodes import NodeDirectory
from cluster.records import NodeStats, keyed_sample
from routing import budgets, errors, intake, metrics
from routing.admission import Admission
from routing.config import GatewayConfig
from routing.keys import ClientKey, KeyRing, key_from_secret
from routing.metering import TokenCounter, reservation
from routing.recorder import UsageRecorder
from routing.refresh import Refresher
from routing.request_context import RequestContext, RequestPlan, context_for, is_event, stream_messages
from routing.selection import NodeSelector, Pick, facts_for
from routing.shadow import Capture, strip_token_ids, verifiable
from routing.views import PublicViews

log = logging.getLogger("meritnet.gateway")

SEED_BOUND = 2**63  # vLLM takes any int64 seed


@dataclass(eq=False)
class _TryAnother(Exception):
    """A node failed the request before anything reached the client: the request moves on to another
    node, keeping `error` (when given) as the answer should no node succeed."""

    error: errors.APIError | None = None


def _cancel_quietly(gen) -> None:
    """Stop an abandoned node's work; its failure to stop changes nothing."""
    try:
        gen.cancel()
    except Exception as exc:  # noqa: BLE001 - the node is being abandoned anyway
        log.debug("cancel of an abandoned node stream failed (%s)", type(exc).__name__)


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
            Admission(
                registry,
                config.chain_id,
                config.network_id,
                {m: spec.task for m, spec in config.metered_models.items()},
            )
            if registry is not None and config.admit_open_nodes
            else None
        )
        self._nodes: dict[str, NodeStats] = {}
        self._in_flight: Counter[str] = Counter()
        self._shadow_key = config.shadow_key.get_secret_value().encode()
        self.keys = KeyRing(
            [key_from_secret(k.get_secret_value()) for k in config.api_keys],
            Path(config.keys_file) if config.keys_file else None,
        )
        # usage records, per-key and per-node counts, shadow offers (routing/recorder.py)
        self.recorder = UsageRecorder(sink, self.keys, lambda: self.refresher.shadow_feed)
        self._challenge_keys = {k.get_secret_value() for k in config.challenge_keys}
        self.refresher = Refresher(self)  # the control plane's snapshot (routing/refresh.py)
        self.views = PublicViews(self)  # the read-only pages (routing/views.py)

    def set_nodes(self, stats: list[NodeStats]) -> None:
        self._nodes = {s.node_id: s for s in stats}
        self.selector.update_nodes(stats)

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

    async def parse(self, request: Request, request_cls: type[BaseModel]) -> BaseModel:
        """The validated request, or an OpenAI-shaped 4xx (routing/intake.py)."""
        return intake.validate(
            await intake.read_json(request, self.config.intake), request_cls, self.config.intake
        )

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
        """Route `body` (a validated Chat/Completion/EmbeddingCompletionRequest) to a node and answer the client. A request
        that ends in an error before an answer was handed over returns its key's token reservation (a
        request that was answered settles it when metered; settling is once per request)."""
        rid = uuid.uuid4().hex
        try:
            return await self._route(request, body, method, key, rid)
        except Exception:
            self.keys.settle(key, rid, 0)
            if key is not None and key.budget_tokens is not None and self._sink is not None:
                self._sink.release.remote(rid)  # no billed record will end its budget hold
            raise

    async def _route(
        self, request: Request, body: Any, method: str, key: ClientKey | None, rid: str
    ) -> Response:
        plan = self._plan(request, body, method, key, rid)
        if key is not None and key.budget_tokens is not None:
            try:
                await self._reserve_budget(plan)
            except asyncio.CancelledError:  # the client left while its hold was taken: no record will end it
                self._sink.release.remote(rid)
                raise
        tried: set[str] = set()
        last_error: errors.APIError | None = None
        for attempt in range(self.config.max_attempts):
            if time.perf_counter() >= plan.deadline:
                raise errors.timed_out(plan.allowed)
            picked = self.selector.pick(plan.facts, exclude=tried)
            if picked is None:
                break
            tried.add(picked.node.node_id)
            try:
                return await self._attempt(plan, picked, tried, last=attempt == self.config.max_attempts - 1)
            except _TryAnother as failed:
                if failed.error is not None:
                    last_error = failed.error
        if not tried:
            raise errors.no_live_node(plan.model)
        if time.perf_counter() >= plan.deadline:
            raise errors.timed_out(plan.allowed)
        raise last_error or errors.upstream_failed(plan.model)

    def _plan(self, request: Request, body: Any, method: str, key: ClientKey | None, rid: str) -> RequestPlan:
        """Check the request and settle everything about it before a node is chosen: a served model, a
        pin only with a challenge key, a seed, what the node is asked for and the client gets back, a
        shadow sample, the key's token reservation, a deadline."""
        started = time.time()
        t0 = time.perf_counter()
        client_body, model = body, body.model
        known = {s.model_id for s in self._nodes.values()}
        if model not in known:
            raise errors.unknown_model(model, sorted(known))
        task = "embed" if method == "embeddings" else "generate"
        if not any(s.model_id == model and s.task == task for s in self._nodes.values()):
            raise errors.wrong_task(model, method)
        pinned = self._target_node(request)
        # The client's body is never changed: the node gets a copy made final for it, once.
        if method == "embeddings":
            body = body.model_copy(update={"request_id": rid})
            stream, strip_ids, client_wants_usage = False, False, False
        else:
            stream, strip_ids, client_wants_usage = self._generation_flags(body)
            body = body.model_copy(update=self._generation_update(body, rid, stream))
        capture = self._shadow_capture(rid, client_body, body, pinned)
        facts = facts_for(body, request.headers, target_node=pinned)
        counter = self._counters.get(model)
        limited = key is not None and (key.tokens_per_min is not None or key.budget_tokens is not None)
        reserved = reservation(body, counter) if limited else 0  # the prompt is tokenized once
        if key is not None and key.tokens_per_min is not None:  # held until the request ends (recorder.meter)
            self.keys.reserve(key, rid, reserved)
        allowed = self.config.timeouts.total_s(intake.max_tokens(body), intake.int_field(body, "n") or 1)
        return RequestPlan(
            rid=rid,
            body=body,
            method=method,
            key=key,
            started=started,
            t0=t0,
            deadline=t0 + allowed,
            allowed=allowed,
            stream=stream,
            client_wants_usage=client_wants_usage,
            strip_ids=strip_ids,
            capture=capture,
            counter=counter,
            facts=facts,
            request_hash=getattr(request.state, "body_sha256", ""),
            reserved=reserved,
        )

    def _generation_flags(self, body: Any) -> tuple[bool, bool, bool]:
        """What the client asked of a generation: (stream, strip the token ids the node is asked for
        again, pass the usage chunk on)."""
        stream = bool(getattr(body, "stream", False))
        strip_ids = self.config.capture_token_ids and not body.return_token_ids
        client_wants_usage = bool(stream and body.stream_options and body.stream_options.include_usage)
        return stream, strip_ids, client_wants_usage

    def _generation_update(self, body: Any, rid: str, stream: bool) -> dict[str, Any]:
        """The fields a generation request gets for its node: the request id, a seed, token ids and
        (streamed) usage, so every request looks alike to the node."""
        update: dict[str, Any] = {"request_id": rid}
        if body.seed is None:  # every request carries a seed, so a seed tells a node nothing
            update["seed"] = secrets.randbelow(SEED_BOUND)
        if self.config.capture_token_ids:
            update["return_token_ids"] = True  # stripped again if the client did not ask
        if stream:
            # Always ask the node for usage so metering is exact; strip it if the client did not ask.
            from vllm.entrypoints.openai.chat_completion.protocol import StreamOptions

            update["stream_options"] = StreamOptions(include_usage=True)
        return update

    async def _reserve_budget(self, plan: RequestPlan) -> None:
        """Hold the request's worst case against its key's budget in the usage store (routing/budgets)."""
        if self._sink is None:
            raise errors.APIError(
                503,
                "Key budgets need the network's usage store, which this gateway has not.",
                type="server_error",
            )
        await budgets.reserve(self._sink, plan.key, plan.rid, plan.reserved, plan.started, plan.allowed + 60)

    def _shadow_capture(self, rid: str, client_body: Any, body: Any, pinned: str | None) -> Capture | None:
        """A keyed sample of organic requests (never a pinned challenge) for validators to re-run:
        whether it can be re-run is judged on the client's own body, the capture keeps what the node gets
        (`body`, with its seed)."""
        if (
            pinned is None
            and self.refresher.shadow_feed is not None
            and keyed_sample(self._shadow_key, rid, self.config.shadow_rate)
            and verifiable(client_body, self.config.tool_call_parser)
        ):
            return Capture(rid, body, self.config.tool_call_parser)
        return None

    async def _attempt(self, plan: RequestPlan, picked: Pick, tried: set[str], last: bool) -> Response:
        """One node's try at the request: the client's answer, the client's own error (raised), or
        _TryAnother when the node failed before the first byte reached the client."""
        node_id = picked.node.node_id
        stats = self._nodes.get(node_id)
        client = self.nodes.client(node_id, open_node=stats is not None and stats.kind == "open")
        gen = client.call(plan.method, plan.body)
        self._begin(node_id)
        ctx = context_for(plan, picked.node, picked.degraded)
        first = await self._first_or_next(ctx, gen, plan, tried, last)
        head = _first_of(first)
        parsed = self._whole_answer(ctx, head, plan.stream)
        if parsed is not None and parsed.error is not None:
            raise self._refusal(ctx, client.vouched, parsed.error)
        if plan.stream:
            return StreamingResponse(
                self._stream(ctx, first, gen),
                media_type="text/event-stream",
                headers=ctx.headers(),
            )
        if parsed is None:  # an event where a whole answer belongs
            self._end(node_id)
            self._node_malformed(node_id, ValueError("a stream event for a non-streamed request"))
            raise _TryAnother(errors.upstream_failed(plan.model))
        return await self._complete(ctx, head)

    async def _first_or_next(
        self, ctx: RequestContext, gen, plan: RequestPlan, tried: set[str], last: bool
    ) -> Any:
        """The node's first message; a node that fails before it is penalised and the request moves on
        (_TryAnother), a client that leaves meanwhile abandons the node."""
        node_id = ctx.node.node_id
        try:
            return await self._first_message(
                gen, node_id, plan.facts, tried, last=last, deadline=plan.deadline, stream=plan.stream
            )
        except asyncio.CancelledError:  # the client went away while the node was working
            self._abandon(ctx, gen)
            raise
        except Exception as exc:  # any node failure moves the request to another node (re-raised so)
            self._end(node_id)
            self.selector.observe_failure(node_id)
            metrics.RETRIES.labels(ctx.model, node_id).inc()
            log.warning(
                "node %s failed before the first byte (%s); trying another", node_id, type(exc).__name__
            )
            _cancel_quietly(gen)
            raise _TryAnother() from exc

    def _whole_answer(self, ctx: RequestContext, head: Any, stream: bool) -> Any:
        """The node's first message parsed when it is a whole JSON body (an answer or an error; a
        non-streamed answer is bounded and tallied here), None when it is a stream event. Anything else
        is not a completion: the node is penalised and the request moves on (_TryAnother)."""
        try:
            parsed = None if is_event(head) else ctx.parse_answer(head, whole=not stream)
        except (ValidationError, ValueError, TypeError) as exc:  # neither: not a completion
            self._end(ctx.node.node_id)
            self._node_malformed(ctx.node.node_id, exc)
            raise _TryAnother(errors.upstream_failed(ctx.model)) from exc
        return parsed

    def _refusal(self, ctx: RequestContext, vouched: bool, error: NodeError) -> Exception:
        """What to raise for a node's error answer: the client's own mistake, from a node whose word
        is trusted, is the answer; the node's fault (or maybe) moves the request on (_TryAnother)."""
        node_id = ctx.node.node_id
        self._end(node_id)
        api_error = errors.from_node_error(error)
        if api_error.status >= 500 or not vouched:  # the node's fault (or maybe): try another
            self.selector.observe_failure(node_id)
            # an open node's own failure is the network's 503, never a 5xx in the node's words
            trusted = vouched or api_error.status < 500
            return _TryAnother(api_error if trusted else errors.upstream_failed(ctx.model))
        self.selector.observe_success(node_id, None, None)
        return api_error

    def _abandon(self, ctx: RequestContext, gen) -> None:
        """A client disconnected before its answer: free the node, stop its work, keep one 'cancelled'
        record (written in the background: the request's own task is being cancelled)."""
        self._end(ctx.node.node_id)
        _cancel_quietly(gen)
        asyncio.get_running_loop().create_task(self.recorder.meter_quietly(ctx, "cancelled"))

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
            if not done and adaptive < limit and (last or not self.selector.has_candidate(facts, tried)):
                done, _ = await asyncio.wait({step}, timeout=limit - adaptive)
            if not done:
                raise TimeoutError(f"no first byte from {node_id}")
            return step.result()
        finally:
            if not step.done():
                step.cancel()

    # ---- response paths --------------------------------------------------------------------
    async def _complete(self, ctx: RequestContext, payload: str) -> Response:
        try:
            ttft = time.perf_counter() - ctx.t0
            ctx.count()
            payload = ctx.with_usage(payload)  # the client sees what it is billed, not the node's claim
            if ctx.strip_ids:
                payload = strip_token_ids(payload)
            ctx.digest.update(payload.encode())
            ctx.ttft = ttft
            await self.recorder.meter(ctx, "ok")
            # Without a stream there is no first-token time: time per token is the whole time
            # spread over the tokens, used for both EWMAs so the latency prediction stays coherent.
            per_token = ttft / max(1, ctx.completion_tokens)
            self.selector.observe_success(ctx.node.node_id, per_token, per_token)
        finally:
            self._end(ctx.node.node_id)
        return Response(payload, media_type="application/json", headers=ctx.headers())

    async def _stream(self, ctx: RequestContext, first: Any, gen) -> AsyncIterator[str]:
        status = "cancelled"
        itl, sent_at = metrics.ITL.labels(ctx.model, ctx.node.node_id), 0.0
        cap = answer_byte_cap(ctx.body)  # all the node may send (in characters)
        try:
            async for chunk in stream_messages(first, gen, self.config.timeouts.stream_idle_s, ctx.deadline):
                out, node_error = ctx.relay(chunk, cap)
                if node_error:
                    status = "error"
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
                if node_error:
                    return
            status = "ok"
            ctx.count()
            ctx.digest.update(sse.DONE.encode())  # the response hash covers every byte the client gets
            await self.recorder.meter(ctx, "ok")
            self.selector.observe_success(ctx.node.node_id, ctx.ttft, ctx.tpot())
            yield sse.DONE
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
                asyncio.get_running_loop().create_task(self.recorder.meter_quietly(ctx, status))

    def _node_malformed(self, node_id: str, exc: Exception) -> None:
        """A node sent something that is not a completion: penalised like a failure, counted."""
        self.selector.observe_failure(node_id)
        metrics.MALFORMED.labels(node_id).inc()
        log.warning("node %s sent a malformed answer (%s)", node_id, type(exc).__name__)

    def _begin(self, node_id: str) -> None:
        self._in_flight[node_id] += 1
        self.selector.begin(node_id)
        metrics.IN_FLIGHT.labels(node_id).set(self._in_flight[node_id])

    def _end(self, node_id: str) -> None:
        self._in_flight[node_id] = max(0, self._in_flight[node_id] - 1)
        self.selector.end(node_id)
        metrics.IN_FLIGHT.labels(node_id).set(self._in_flight[node_id])
