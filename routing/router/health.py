"""Per-node health the router learns from outcomes: bans with exponential backoff, latency EWMAs,
first-byte timeouts, and the Prometheus view of them.

A failure (error or timeout) bans the node for base x 2^(streak-1) seconds, capped; a success
clears the streak and the ban. Failures while the node is already banned are the same incident
(attempts that were under way when it failed) and do not escalate the streak: on the harsh-120
fleet, escalating on each of a hung H100's queued timeouts kept healthy fast nodes banned for a
minute after they recovered, and the rest of the fleet queued (TTFT p50 3.5 s vs 0.1 s). Bans are penalties, not removals: the `not-banned` filter keeps
the least-recently-failed node of a model eligible when all of them are banned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from routing.router.config import HealthSpec


@dataclass(slots=True)
class NodeHealthState:
    """Mutable health of one node (owned by NodeHealth; snapshots copy it)."""

    error_streak: int = 0
    banned_until: float = 0.0
    last_failure_at: float | None = None
    ttft_ewma_s: float | None = None
    tpot_ewma_s: float | None = None
    timed_at: float | None = None  # clock time of the latest latency sample


class NodeHealth:
    """Ban tracker and latency statistics for every node the router has heard of."""

    def __init__(self, spec: HealthSpec, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.clock = clock
        self.nodes: dict[str, NodeHealthState] = {}

    def state(self, node_id: str) -> NodeHealthState:
        st = self.nodes.get(node_id)
        if st is None:
            st = self.nodes[node_id] = NodeHealthState()
        return st

    def ban_duration(self, streak: int) -> float:
        """Seconds a node is banned after `streak` consecutive failures (streak >= 1)."""
        return min(self.spec.ban_max_s, self.spec.ban_base_s * 2.0 ** min(streak - 1, 60))

    def failure(self, node_id: str, now: float | None = None) -> float:
        """Record a failed or timed-out attempt; returns the time the ban ends."""
        now = self.clock() if now is None else now
        if not math.isfinite(now):
            raise ValueError(f"failure time must be finite, got {now!r}")
        st = self.state(node_id)
        st.last_failure_at = now
        if st.banned_until > now:
            # Same incident: attempts that were already under way when the node was banned (its
            # queue on a hung node, say) fail one after another. Escalating on each would ban a
            # busy node for ban_max_s after one hiccup; only a failure after the ban ran out
            # (the node was given another chance and failed it) doubles the ban.
            return st.banned_until
        st.error_streak += 1
        st.banned_until = now + self.ban_duration(st.error_streak)
        return st.banned_until

    def success(self, node_id: str, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """Record a completed attempt: clears streak and ban, folds the latencies into the EWMAs."""
        st = self.state(node_id)
        st.error_streak = 0
        st.banned_until = 0.0
        a = self.spec.ewma_alpha
        if any(x is not None and math.isfinite(x) and x >= 0 for x in (ttft_s, tpot_s)):
            st.timed_at = self.clock()
        if ttft_s is not None and math.isfinite(ttft_s) and ttft_s >= 0:
            st.ttft_ewma_s = ttft_s if st.ttft_ewma_s is None else (1 - a) * st.ttft_ewma_s + a * ttft_s
        if tpot_s is not None and math.isfinite(tpot_s) and tpot_s >= 0:
            st.tpot_ewma_s = tpot_s if st.tpot_ewma_s is None else (1 - a) * st.tpot_ewma_s + a * tpot_s

    def forget_stale_latency(self, now: float | None = None) -> list[str]:
        """Forget the EWMAs of nodes with no latency sample for `latency_stale_s` (they score as never
        timed, so they get a request and a fresh measurement); the node ids whose EWMAs went."""
        now = self.clock() if now is None else now
        stale = [
            node_id
            for node_id, st in self.nodes.items()
            if st.timed_at is not None and now - st.timed_at > self.spec.latency_stale_s
        ]
        for node_id in stale:
            st = self.nodes[node_id]
            st.ttft_ewma_s = st.tpot_ewma_s = st.timed_at = None
        return stale

    def is_banned(self, node_id: str, now: float | None = None) -> bool:
        st = self.nodes.get(node_id)
        now = self.clock() if now is None else now
        return st is not None and st.banned_until > now

    def timeout_s(self, node_id: str) -> float:
        """First-byte timeout for this node: multiplier x its TTFT EWMA, clamped; max_s when unknown."""
        t = self.spec.timeouts
        st = self.nodes.get(node_id)
        if st is None or st.ttft_ewma_s is None:
            return t.max_s
        return min(t.max_s, max(t.min_s, t.ttft_multiplier * st.ttft_ewma_s))

    def forget(self, keep: Iterable[str]) -> None:
        """Drop nodes that left the network (keeps memory and metrics bounded)."""
        keep = set(keep)
        for node_id in [n for n in self.nodes if n not in keep]:
            del self.nodes[node_id]


class HealthCollector(Collector):
    """Prometheus collector computed at scrape time, so a ban that expired shows as 0 without a timer.

    Exposes meritnet_node_banned{node} (1 while banned), meritnet_node_error_streak{node} and
    meritnet_node_ban_remaining_seconds{node}. Register it once per registry:
    `Router(..., registry=REGISTRY)` does it for you.
    """

    def __init__(self, health: NodeHealth) -> None:
        self.health = health

    def collect(self):
        now = self.health.clock()
        banned = GaugeMetricFamily(
            "meritnet_node_banned", "1 while the router bans the node.", labels=["node"]
        )
        streak = GaugeMetricFamily(
            "meritnet_node_error_streak", "Consecutive failed attempts on the node.", labels=["node"]
        )
        remaining = GaugeMetricFamily(
            "meritnet_node_ban_remaining_seconds", "Seconds until the node's ban ends.", labels=["node"]
        )
        for node_id, st in sorted(self.health.nodes.items()):
            left = max(0.0, st.banned_until - now)
            banned.add_metric([node_id], 1.0 if left > 0 else 0.0)
            streak.add_metric([node_id], float(st.error_streak))
            remaining.add_metric([node_id], left)
        yield banned
        yield streak
        yield remaining

    def describe(self):
        # Describing with no samples lets registration check for name clashes without a scrape.
        yield GaugeMetricFamily("meritnet_node_banned", "1 while the router bans the node.", labels=["node"])
        yield GaugeMetricFamily(
            "meritnet_node_error_streak", "Consecutive failed attempts on the node.", labels=["node"]
        )
        yield GaugeMetricFamily(
            "meritnet_node_ban_remaining_seconds", "Seconds until the node's ban ends.", labels=["node"]
        )
