"""A gateway replica's view of the control plane, kept fresh in the background: the registry's node
snapshot and links, the validators' consensus scores, the shadow feed, and this replica's load reported
back. Nothing on a request path waits on another actor: requests read what the last refresh left
(routing/gateway.py), and a registry that is restarting leaves the last snapshot serving."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from cluster.records import NodeStats, QualityScores
from routing import metrics

if TYPE_CHECKING:
    from routing.gateway import GatewayCore

log = logging.getLogger("meritnet.gateway")

REMOTE_TIMEOUT_S = 10.0  # every background call to another actor is bounded by this
_ABSENT_RETRY_S = 5.0  # validators start after the gateway: their actors appear within seconds


class Refresher:
    """Refreshes `core` every `config.refresh_interval_s` once started (`ensure_started`)."""

    def __init__(self, core: GatewayCore) -> None:
        self._core = core
        self._task: asyncio.Task | None = None
        self._absent_until: dict[str, float] = {}  # actor name -> when to look it up again
        self._consensus: Any = None
        self.shadow_feed: Any = None  # the shadow feed actor, once it exists
        self.scores: QualityScores | None = None  # the latest consensus, for /status
        self.gateway_id = uuid.uuid4().hex[:12]  # this replica, in the registry's load reports

    async def once(self) -> None:
        core = self._core
        core.keys.reload()
        registry = core._registry
        if registry is None:
            return
        # bounded: a stuck registry must not stall the refresher (the last snapshot keeps serving)
        stats: list[NodeStats] = await asyncio.wait_for(registry.snapshot.remote(), REMOTE_TIMEOUT_S)
        core.nodes.set_links(await asyncio.wait_for(registry.links.remote(), REMOTE_TIMEOUT_S))
        core.set_nodes(stats)
        await self._quality()
        if self.shadow_feed is None and core.config.shadow_rate > 0:
            self.shadow_feed = await self.named_actor(core.config.shadow_feed_name)
        models = Counter(s.model_id for s in stats if s.live)
        for model in {s.model_id for s in stats}:
            metrics.LIVE_NODES.labels(model).set(models.get(model, 0))
        registry.report_load.remote(self.gateway_id, dict(core._in_flight))

    async def _quality(self) -> None:
        """Pull the validators' consensus scores, if a consensus actor runs."""
        if self._consensus is None:
            self._consensus = await self.named_actor(self._core.config.consensus_name)
            if self._consensus is None:
                return  # no validators in this network: every node stays unscored
        scores: QualityScores | None = await asyncio.wait_for(
            self._consensus.latest.remote(), REMOTE_TIMEOUT_S
        )
        if scores is not None and (self.scores is None or scores.epoch != self.scores.epoch):
            self._core.selector.update_quality(scores)
            self.scores = scores

    async def named_actor(self, name: str):
        """The named actor, or None while it does not exist (validators are optional). An absent actor
        is looked up again only every `_ABSENT_RETRY_S`, not on every refresh."""
        import ray

        now = time.monotonic()
        if now < self._absent_until.get(name, 0.0):
            return None
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(ray.get_actor, name, namespace=self._core.config.namespace),
                REMOTE_TIMEOUT_S,
            )
        except ValueError:
            self._absent_until[name] = now + _ABSENT_RETRY_S
            return None

    async def _forever(self) -> None:
        while True:
            try:
                await self.once()
            except Exception as exc:  # noqa: BLE001 - registry restarting: keep serving from the last snapshot
                log.warning(
                    "gateway: node snapshot refresh failed (%s); using the last one", type(exc).__name__
                )
            await asyncio.sleep(self._core.config.refresh_interval_s)

    async def ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._forever())
            try:
                await self.once()
            except Exception as exc:  # noqa: BLE001 - the background refresher retries
                log.info("gateway: first node snapshot not ready (%s)", type(exc).__name__)
