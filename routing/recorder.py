"""What the gateway keeps of each request once a node answered it (or failed it): the usage record, written
durably to the usage store; the metrics per node, model and key; the key's limits settled; and, for a
sampled organic request, the offer to validators' shadow feed. routing/gateway.py calls `meter` at the end
of every attempt that reached a node."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from routing import errors, metrics
from routing.keys import KeyRing
from routing.metering import observe
from routing.request_context import RequestContext

log = logging.getLogger("meritnet.gateway")


class UsageRecorder:
    """`sink`: the usage store's actor handle (`record.remote(list[UsageRecord])`), None without one;
    `shadow_feed()`: the validators' shadow feed handle when there is one."""

    def __init__(self, sink: Any, keys: KeyRing, shadow_feed: Callable[[], Any]) -> None:
        self._sink, self._keys, self._shadow_feed = sink, keys, shadow_feed
        self.served: Counter[str] = Counter()  # completed requests per node through this replica

    async def meter(self, ctx: RequestContext, status: str) -> None:
        """Count the request (metrics, its key's limits), offer a sampled one to validators, and write its
        usage record durably: retried for about 3 s, then a 503 (an answer never goes out unbilled)."""
        if status != "ok":
            ctx.count()  # what was forwarded before the failure (audit only: not an ok record)
        observe(ctx.node.node_id, ctx.tally, ctx.prompt_tokens, ctx.completion_tokens, ctx.counted)
        if ctx.key is not None:  # per key: requests by outcome, tokens against its limit
            metrics.KEY_REQUESTS.labels(ctx.key.key_id, status).inc()
            metrics.KEY_TOKENS.labels(ctx.key.key_id).inc(ctx.prompt_tokens + ctx.completion_tokens)
            self._keys.settle(ctx.key, ctx.rid, ctx.prompt_tokens + ctx.completion_tokens)
        rec = ctx.record(status)
        if status == "ok":
            self.served[ctx.node.node_id] += 1
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

    def _offer_for_shadow(self, ctx: RequestContext) -> None:
        """Hand a sampled organic answer to validators; fire-and-forget, never fails the request."""
        try:
            self._shadow_feed().offer.remote([ctx.shadow_item()])
            metrics.SHADOW_OFFERED.labels(ctx.model, ctx.node.node_id).inc()
        except Exception as exc:  # noqa: BLE001 - content is never logged, only the failure kind
            log.warning("shadow offer of %s failed (%s)", ctx.rid, type(exc).__name__)

    async def meter_quietly(self, ctx: RequestContext, status: str) -> None:
        """`meter` for a request whose client already has its answer (or left): failures are logged."""
        try:
            await self.meter(ctx, status)
        except Exception as exc:  # noqa: BLE001 - the client's stream already ended; meter logged it
            log.debug("metering after the stream failed (%s)", type(exc).__name__)
