"""One request on its way through the gateway (routing/gateway.py): what was decided about it before a
node was chosen (`RequestPlan`), what one node's attempt at it accumulates for its usage record and
how the node's stream is relayed to the client (`RequestContext`), and the node's messages chained
with the request's timeouts (`stream_messages`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from cluster import sse
from cluster.completions import answer_byte_cap, parse_body
from cluster.embeddings import parse_embeddings
from cluster.records import UsageRecord
from routing import errors
from routing.intake import prompts
from routing.keys import ClientKey
from routing.metering import Tally, TokenCounter, metered
from routing.router import RequestFacts
from routing.shadow import Capture, strip_token_ids


def is_event(message: Any) -> bool:
    """A stream event (`data: ...`) rather than a whole JSON body; anything but text raises."""
    if not isinstance(message, str):
        raise TypeError(f"a node sent a {type(message).__name__}, not text")
    return sse.is_event(message)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """Everything settled about a request before its first node is chosen; every attempt reads it.
    `body` is final by now: seed drawn, token ids and usage asked of the node, request id set."""

    rid: str
    body: Any  # a validated Chat/Completion/EmbeddingCompletionRequest
    method: str  # "chat", "completions" or "embeddings"
    key: ClientKey | None
    started: float  # unix time, for the usage record
    t0: float  # perf_counter at intake: TTFT, E2E and the deadline count from here
    deadline: float  # perf_counter
    allowed: float  # the request's total time limit (s), for the 504's message
    stream: bool
    client_wants_usage: bool  # a streamed usage chunk is passed on only when the client asked for it
    strip_ids: bool  # token ids were asked of the node for the gateway, not by the client
    capture: Capture | None  # sampled for shadow verification
    counter: TokenCounter | None  # the model's tokenizer, when the gateway meters it
    facts: RequestFacts  # what the router may know about the request
    request_hash: str = ""  # sha256 hex of the body bytes the client sent (routing/intake.read_json)
    reserved: int = 0  # tokens held against the key's limits: prompt + max_tokens x n (routing/metering)

    @property
    def model(self) -> str:
        return self.body.model


class RequestContext:
    """Everything one node's attempt at a request accumulates for its usage record."""

    __slots__ = (
        "answer",
        "body",
        "capture",
        "client_wants_usage",
        "completion_tokens",
        "counted",
        "counter",
        "deadline",
        "degraded",
        "digest",
        "key",
        "model",
        "node",
        "prompt_tokens",
        "received",
        "request_hash",
        "rid",
        "started",
        "strip_ids",
        "t0",
        "tally",
        "ttft",
    )

    def __init__(self, plan: RequestPlan, node, degraded: tuple[str, ...] = ()):
        self.rid, self.node, self.body, self.model = plan.rid, node, plan.body, plan.body.model
        self.started, self.t0, self.client_wants_usage = plan.started, plan.t0, plan.client_wants_usage
        self.strip_ids, self.capture = plan.strip_ids, plan.capture
        self.counter, self.key, self.deadline = plan.counter, plan.key, plan.deadline
        self.request_hash = plan.request_hash
        self.degraded = degraded  # the filters whose refusal the pick overrode
        self.prompt_tokens = self.completion_tokens = 0
        self.received = 0  # characters the node sent so far (bounded by answer_byte_cap)
        self.ttft: float | None = None
        self.digest = hashlib.sha256()
        self.tally = Tally.for_request(plan.body, plan.counter)  # ids bounded as they arrive
        self.counted = False
        self.answer: Any = None  # an embeddings answer, parsed (EmbeddingContext)

    def headers(self) -> dict[str, str]:
        """The response's own headers: its request id, its node, and, on a degraded pick, the filters
        whose refusal was overridden (x-meritnet-degraded: quality-floor)."""
        out = {"x-meritnet-request-id": self.rid, "x-meritnet-node": self.node.node_id}
        if self.degraded:
            out["x-meritnet-degraded"] = ",".join(self.degraded)
        return out

    def count(self) -> None:
        """The gateway's own token counts of what was forwarded so far (routing/metering.py)."""
        self.prompt_tokens, self.completion_tokens, self.counted = metered(
            self.body, self.tally, self.counter
        )

    def parse_answer(self, head: str, whole: bool) -> Any:
        """A node's JSON body (an answer or an error) parsed; a `whole` (non-streamed) answer is also
        bounded and tallied. Raises ValueError (ValidationError) or TypeError for anything else."""
        parsed = parse_body(head)
        if whole and parsed.error is None:
            if len(head) > answer_byte_cap(self.body):
                raise ValueError("an answer larger than the request allows")
            self.tally.add(parsed)  # ValueError for ids beyond the vocabulary or max_tokens
        return parsed

    def with_usage(self, data: str) -> str:
        """A node's JSON body (or stream chunk) with its usage replaced by the gateway's counts."""
        obj = json.loads(data)
        obj["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    def relay(self, chunk: Any, cap: int) -> tuple[list[str], bool]:
        """One message from a streaming node as it goes downstream (its events, tallied, with the usage
        chunk rewritten to the gateway's counts or dropped, token ids stripped when the client did not
        ask for them), and whether it carried the node's error, which ends the stream. Raises
        ValueError for anything not a stream event or past `cap` characters, TypeError for non-text."""
        out: list[str] = []  # one message downstream per message from the node
        for piece in chunk if isinstance(chunk, list) else [chunk]:
            self.received += len(piece) if isinstance(piece, str) else 0
            if self.received > cap:
                raise ValueError(f"an answer larger than the request allows ({cap} bytes)")
            parsed = _stream_event(piece)
            if parsed is None:
                continue  # [DONE]: sent after the usage record is durable
            if parsed.error is not None:  # an ErrorResponse mid-stream, or an open node's error event
                out.append(errors.from_node_error(parsed.error).sse_event().decode())
                return out, True
            self.tally.add(parsed)
            if not parsed.choices and parsed.usage is not None:  # the node's usage chunk
                if not self.client_wants_usage:
                    continue
                self.count()
                piece = sse.frame(self.with_usage(sse.payload(piece)))
            out.append(strip_token_ids(piece) if self.strip_ids else piece)
        return out, False

    def shadow_item(self) -> Any:
        """What validators get of this sampled request once it completed (`plan.capture` is set): choice
        0 as the client got it, with the completion tokens the node *reported* (held to its word)."""
        claimed = self.tally.reported.completion_tokens if self.tally.reported else self.completion_tokens
        return self.capture.served(self.node.node_id, self.tally, claimed)

    def tpot(self) -> float | None:
        """Time per output token after the first, or None without a first token time or a second token."""
        if self.ttft is None or self.completion_tokens <= 1:
            return None
        return (time.perf_counter() - self.t0 - self.ttft) / (self.completion_tokens - 1)

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
            request_hash=self.request_hash,
            response_hash=self.digest.hexdigest(),
        )


class EmbeddingContext(RequestContext):
    """One node's attempt at an embeddings request: one whole answer of vectors, billed its inputs'
    tokens (routing/metering.py counts them as prompts), nothing generated."""

    __slots__ = ()

    def parse_answer(self, head: str, whole: bool) -> Any:
        parsed = parse_embeddings(head, len(prompts(self.body)), self.body.encoding_format)
        if parsed.usage is not None:
            self.tally.reported = parsed.usage  # the node's word, compared with the gateway's count
        self.answer = parsed
        return parsed

    def shadow_item(self) -> Any:
        return self.capture.served_embedding(self.node.node_id, self.answer)

    def with_usage(self, data: str) -> str:
        obj = json.loads(data)
        obj["usage"] = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def context_for(plan: RequestPlan, node, degraded: tuple[str, ...] = ()) -> RequestContext:
    """The context of one node's attempt at `plan`, by the request's kind."""
    kind = EmbeddingContext if plan.method == "embeddings" else RequestContext
    return kind(plan, node, degraded)


def _stream_event(piece: Any) -> Any:
    """A streamed message parsed: a data event, or a whole error body (vLLM's ErrorResponse
    mid-stream); None for [DONE]. Anything else raises (ValueError, TypeError)."""
    if not is_event(piece):
        parsed = parse_body(piece)
        if parsed.error is None:
            raise ValueError("not a stream event")
        return parsed
    if sse.is_done(piece):
        return None
    data = sse.payload(piece)
    if not data.startswith("{"):
        raise ValueError("not a data event")
    return parse_body(data)


async def stream_messages(first, gen, idle_timeout_s: float, deadline: float):
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
