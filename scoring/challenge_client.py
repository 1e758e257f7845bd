"""The validator's HTTP client: challenges sent through the gateway, and the strict parsing of what comes
back into a `ChallengeResponse`.

`http_send(...)` is the real `SendFn` a `scoring.Validator` is given: it POSTs each challenge to the
gateway, pinned to the target node with `x-meritnet-node` + `x-meritnet-challenge-key`. The answer is
parsed with the one strict parser of node output (`cluster.completions`); output that does not parse
is a *malformed* answer (fraud), not unavailability.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr, ValidationError

from cluster import sse
from cluster.completions import MAX_IDS, NodeUsage, parse_body
from cluster.embeddings import parse_embeddings
from cluster.node_http import PATHS
from cluster.nodes import MAX_EVENT_BYTES
from scoring.challenge import ChallengeRequest


@dataclass(frozen=True, slots=True)
class ChallengeResponse:
    """What came back for one challenge, parsed from the OpenAI response (or stream)."""

    ok: bool
    status: int = 0
    text: str = ""
    token_ids: tuple[int, ...] | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    error: str = ""
    malformed: str = ""  # set when the answer came back but cannot be verified (fraud, not unavailability)
    vectors: tuple[tuple[float, ...], ...] | None = None  # an embeddings challenge's answer, one per input


SendFn = Callable[[ChallengeRequest], Awaitable[ChallengeResponse]]
EMBEDDINGS_PATH = PATHS["embeddings"]


def http_send(
    base_url: str, challenge_key: str | SecretStr, api_key: str | SecretStr | None = None, client: Any = None
) -> SendFn:
    """A SendFn that POSTs challenges to the gateway, pinned to the target node by header."""
    import httpx

    ck = challenge_key.get_secret_value() if isinstance(challenge_key, SecretStr) else challenge_key
    ak = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    http = client or httpx.AsyncClient(base_url=base_url, timeout=None)

    async def send(req: ChallengeRequest) -> ChallengeResponse:
        headers = {"x-meritnet-node": req.node_id, "x-meritnet-challenge-key": ck}
        if ak:
            headers["authorization"] = f"Bearer {ak}"
        t0 = time.perf_counter()
        if not req.body.get("stream"):
            r = await http.post(req.path, json=req.body, headers=headers)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                return ChallengeResponse(
                    ok=False, status=r.status_code, elapsed_s=elapsed, error=r.text[:200]
                )
            if req.path == EMBEDDINGS_PATH:
                return parse_vectors(r.content, len(req.body["input"]), elapsed)
            try:
                data = r.json()
            except ValueError as exc:  # garbage instead of JSON
                return _malformed(exc, elapsed, elapsed)
            return parse_completion(data, status=200, ttft_s=elapsed, elapsed_s=elapsed)
        chunks: list[dict] = []
        ttft = None
        async with http.stream("POST", req.path, json=req.body, headers=headers) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                return ChallengeResponse(
                    ok=False, status=r.status_code, error=body[:200], elapsed_s=time.perf_counter() - t0
                )
            events = sse.EventSplitter(MAX_EVENT_BYTES)
            try:
                async for data in r.aiter_raw():
                    for event in events.feed(data):
                        if not sse.is_event(event) or sse.is_done(event):
                            continue
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        chunks.append(json.loads(sse.payload(event)))
                events.close()
            except ValueError as exc:  # garbage instead of JSON chunks, or events cut or oversized
                return _malformed(exc, time.perf_counter() - t0, ttft)
        return parse_stream(chunks, ttft_s=ttft, elapsed_s=time.perf_counter() - t0)

    return send


def _malformed(exc: Exception, elapsed_s: float, ttft_s: float | None = None) -> ChallengeResponse:
    """The node answered, but with output that is not a well-formed completion: fraud, not downtime."""
    what = f"{exc.error_count()} invalid fields" if isinstance(exc, ValidationError) else type(exc).__name__
    return ChallengeResponse(
        ok=True, status=200, malformed=f"malformed completion ({what})", ttft_s=ttft_s, elapsed_s=elapsed_s
    )


def parse_vectors(raw: bytes, inputs: int, elapsed_s: float) -> ChallengeResponse:
    """A float embeddings answer -> ChallengeResponse with its vectors, through the gateway's own strict
    parser of a node's vectors (cluster.embeddings)."""
    try:
        body = parse_embeddings(raw, inputs, "float")
    except ValueError as exc:  # ValidationError included
        return _malformed(exc, elapsed_s, elapsed_s)
    if body.error is not None:
        return ChallengeResponse(ok=False, status=200, error=str(body.error)[:200], elapsed_s=elapsed_s)
    vectors = tuple(tuple(e.embedding) for e in sorted(body.data, key=lambda e: e.index))
    return ChallengeResponse(ok=True, status=200, vectors=vectors, ttft_s=elapsed_s, elapsed_s=elapsed_s)


def parse_completion(data: Any, status: int, ttft_s: float | None, elapsed_s: float) -> ChallengeResponse:
    """A non-streamed chat or completions response (decoded JSON) -> ChallengeResponse."""
    try:
        body = parse_body(data)
    except ValidationError as exc:
        return _malformed(exc, elapsed_s, ttft_s)
    if body.error is not None or not body.choices:
        return ChallengeResponse(ok=False, status=status, error=str(body.error or "no choices")[:200])
    choice = body.choices[0]
    usage = body.usage or NodeUsage()
    return ChallengeResponse(
        ok=True,
        status=status,
        text=choice.content,
        token_ids=tuple(choice.token_ids) if choice.token_ids is not None else None,
        completion_tokens=usage.completion_tokens,
        finish_reason=choice.finish_reason,
        ttft_s=ttft_s,
        elapsed_s=elapsed_s,
    )


def parse_stream(chunks: Sequence[Any], ttft_s: float | None, elapsed_s: float) -> ChallengeResponse:
    """SSE chunks (already JSON-decoded) -> ChallengeResponse; ids and text are concatenated."""
    text, ids, finish, usage, have_ids = [], [], None, NodeUsage(), False
    for raw in chunks:
        try:
            ch = parse_body(raw)
        except ValidationError as exc:
            return _malformed(exc, elapsed_s, ttft_s)
        if ch.error is not None:
            return ChallengeResponse(ok=False, status=200, error=str(ch.error)[:200], elapsed_s=elapsed_s)
        usage = ch.usage or usage
        for choice in ch.choices:
            text.append(choice.content)
            if choice.token_ids is not None:
                have_ids = True
                ids.extend(choice.token_ids)
            finish = choice.finish_reason or finish
        if len(ids) > MAX_IDS:
            return ChallengeResponse(
                ok=True,
                status=200,
                malformed=f"malformed completion (over {MAX_IDS} token ids)",
                ttft_s=ttft_s,
                elapsed_s=elapsed_s,
            )
    if finish is None:
        return ChallengeResponse(
            ok=False, status=200, error="stream ended without a finish_reason", elapsed_s=elapsed_s
        )
    return ChallengeResponse(
        ok=True,
        status=200,
        text="".join(text),
        token_ids=tuple(ids) if have_ids else None,
        completion_tokens=usage.completion_tokens,
        finish_reason=finish,
        ttft_s=ttft_s,
        elapsed_s=elapsed_s,
    )
