"""The Router: compiled profiles + node health + a cached snapshot of the fleet.

Two layers, both used by the gateway and by benchmarks.fleet:
- `pick(facts, snapshots, ...)` is the pure decision: given snapshots, return a Decision.
- The fleet view (`update_nodes`, `update_quality`, `begin`/`end`, `observe_*`) keeps each
  model's nodes as numpy Columns (columns.py) and writes a node's row whenever one of its inputs
  changes, so `route(facts)` costs a dictionary lookup plus the decision. Background refreshes
  feed it; the hot path never makes a remote call.
Not thread-safe: call it from one event loop (the gateway's), as Serve replicas do.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from cluster.records import NodeStats, QualityScores
from routing.router.columns import Columns
from routing.router.config import DEFAULT_PROFILE_PATH, RouterConfig, build_profiles, load_config
from routing.router.framework import PickContext, PluginTimings, Profile
from routing.router.health import HealthCollector, NodeHealth, NodeHealthState
from routing.router.snapshot import Decision, NodeSnapshot, NoEligibleNode, RequestFacts


def build_snapshot(
    stats: NodeStats, quality: float | None, health: NodeHealthState, in_flight: int
) -> NodeSnapshot:
    """One node's snapshot from the registry's stats, the consensus score and the router's health view.

    Capacity is per replica in NodeStats, so the node's capacity is capacity x running replicas
    (at least one replica's worth, so a node scaling up is not scored as having no room).
    """
    return NodeSnapshot(
        node_id=stats.node_id,
        model_id=stats.model_id,
        accelerator=stats.accelerator_type,
        capacity=stats.capacity * max(1, stats.running_replicas),
        live=stats.live,
        in_flight=in_flight,
        queue_depth=0,
        ttft_ewma_s=health.ttft_ewma_s,
        tpot_ewma_s=health.tpot_ewma_s,
        error_streak=health.error_streak,
        banned_until=health.banned_until,
        last_failure_at=health.last_failure_at,
        quality=quality,
        joined_at=stats.joined_at,
    )


class Router:
    """Quality-aware router. Build it with `Router.from_yaml(path)` or `Router(RouterConfig)`.

    `clock` (seconds, default time.time) drives bans and probation ages and is injectable for
    tests and simulations; `rng` makes decisions reproducible; `registry` (a prometheus
    CollectorRegistry) gets the ban gauges registered, or pass None and register
    `router.collector` yourself.
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        registry=None,
    ) -> None:
        self.config = config
        self.profiles: dict[str, Profile] = build_profiles(config)
        self.clock = clock
        self.rng = rng if rng is not None else random.Random(config.seed)
        self.health = NodeHealth(config.health, clock)
        self.timings = PluginTimings()
        self.collector = HealthCollector(self.health)
        if registry is not None:
            registry.register(self.collector)
        self._stats: dict[str, NodeStats] = {}
        self._quality: dict[str, float] = {}
        self._local: dict[str, int] = {}  # requests this router's caller has outstanding per node
        self._others: dict[str, int] = {}  # in-flight reported by the registry beyond our own
        self._cols: dict[str, Columns] = {}  # model -> its nodes' columns
        self._row: dict[str, tuple[Columns, int]] = {}  # node -> (its model's columns, its row)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **kwargs) -> Router:
        """Router from a routing YAML file (None: deploy/profiles/default.yaml)."""
        return cls(load_config(path or DEFAULT_PROFILE_PATH), **kwargs)

    # ---- the pure decision -------------------------------------------------------------------
    def pick(
        self,
        facts: RequestFacts,
        snapshots: Sequence[NodeSnapshot],
        exclude: frozenset[str] | set[str] = frozenset(),
        profile: str | None = None,
        explain: bool = False,
        now: float | None = None,
    ) -> Decision:
        """Choose a node for `facts` among `snapshots`, skipping node ids in `exclude`.

        `profile` None means the config's challenge profile for challenges, organic otherwise.
        Raises NoEligibleNode when nothing survives the filters.
        """
        prof = self._profile(facts, profile)
        cols = Columns(snapshots)
        ctx = PickContext(self.clock() if now is None else now, self.rng)
        return prof.run(facts, cols, cols.mask(exclude), ctx, self.timings, explain)

    def _profile(self, facts: RequestFacts, profile: str | None) -> Profile:
        if profile is None:
            profile = self.config.challenge_profile if facts.is_challenge else self.config.organic_profile
        prof = self.profiles.get(profile)
        if prof is None:
            raise ValueError(
                f"unknown routing profile {profile!r}; configured: {', '.join(sorted(self.profiles))}"
            )
        return prof

    # ---- the fleet view ----------------------------------------------------------------------
    def route(
        self,
        facts: RequestFacts,
        exclude: frozenset[str] | set[str] = frozenset(),
        profile: str | None = None,
        explain: bool = False,
        cached: bool = True,
    ) -> Decision:
        """`pick` over the router's own view of the nodes serving `facts.model`.

        `cached=False` recomputes every precomputed result (for tests: the answer must not change)."""
        prof = self._profile(facts, profile)
        cols = self._cols.get(facts.model)
        if cols is None:
            raise NoEligibleNode(
                facts.model, prof.name, "no node serving this model is registered", "unregistered"
            )
        ctx = PickContext(self.clock(), self.rng)
        return prof.run(facts, cols, cols.mask(exclude), ctx, self.timings, explain, cached)

    def snapshots(self, model: str | None = None) -> tuple[NodeSnapshot, ...]:
        """Current snapshots of the nodes serving `model` (all nodes when None)."""
        models = self._cols.values() if model is None else [self._cols[model]] if model in self._cols else []
        return tuple(c.snapshot(i) for c in models for i in range(c.size))

    def update_nodes(self, stats: Iterable[NodeStats]) -> None:
        """Replace the node list with the registry's latest stats (background refresh)."""
        fresh = {s.node_id: s for s in stats}
        for node_id, s in fresh.items():
            self._others[node_id] = max(0, s.in_flight - self._local.get(node_id, 0))
        same = fresh.keys() == self._stats.keys() and all(
            fresh[n].model_id == self._stats[n].model_id for n in fresh
        )
        self._stats = fresh
        self.health.forget(fresh)
        self.health.forget_stale_latency()  # the rebuild below writes what is left into the rows
        for gone in [n for n in self._local if n not in fresh and self._local[n] == 0]:
            del self._local[gone]
        if same:  # the usual refresh: same nodes, new stats; rows rewritten in place (versions bump)
            for node_id in fresh:
                self._rebuild(node_id)
        else:
            self._rebuild_all()

    def update_quality(self, scores: QualityScores | Mapping[str, float]) -> None:
        """Replace the consensus quality scores (nodes absent from them are unscored)."""
        quality = scores.quality if isinstance(scores, QualityScores) else scores
        for node_id, q in quality.items():
            if not 0.0 <= q <= 1.0:  # also rejects NaN
                raise ValueError(f"quality of {node_id!r} must be in [0,1], got {q!r}")
        self._quality = dict(quality)
        for node_id, (cols, row) in self._row.items():
            q = self._quality.get(node_id)
            cols.set("quality", row, math.nan if q is None else q)

    def begin(self, node_id: str) -> None:
        """A request was sent to `node_id` (counts toward its load)."""
        self._local[node_id] = self._local.get(node_id, 0) + 1
        at = self._row.get(node_id)
        if at is not None:
            at[0].add("in_flight", at[1], 1.0)

    def end(self, node_id: str) -> None:
        """A request on `node_id` finished, failed or was cancelled."""
        local = self._local.get(node_id, 0)
        self._local[node_id] = max(0, local - 1)
        at = self._row.get(node_id)
        if at is not None and local > 0:
            at[0].add("in_flight", at[1], -1.0)

    def observe_success(self, node_id: str, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """An attempt on `node_id` succeeded: clear its ban, update its TTFT / per-token EWMAs (seconds)."""
        self.health.success(node_id, ttft_s, tpot_s)
        self._write_health(node_id)

    def observe_failure(self, node_id: str, now: float | None = None) -> float:
        """An attempt failed or timed out: ban `node_id` with backoff. Returns when the ban ends."""
        until = self.health.failure(node_id, now)
        self._write_health(node_id)
        return until

    def timeout_s(self, node_id: str) -> float:
        """First-byte timeout to use for `node_id` (seconds)."""
        return self.health.timeout_s(node_id)

    def in_flight(self, node_id: str) -> int:
        return self._local.get(node_id, 0) + self._others.get(node_id, 0)

    def _write_health(self, node_id: str) -> None:
        at = self._row.get(node_id)
        if at is None:
            return  # not (or no longer) registered: outcomes are still kept in health
        cols, row = at
        h = self.health.state(node_id)
        cols.set("ttft", row, math.nan if h.ttft_ewma_s is None else h.ttft_ewma_s)
        cols.set("tpot", row, math.nan if h.tpot_ewma_s is None else h.tpot_ewma_s)
        cols.set("error_streak", row, float(h.error_streak))
        cols.set("banned_until", row, h.banned_until)
        cols.set("last_failure_at", row, 0.0 if h.last_failure_at is None else h.last_failure_at)

    def _snapshot(self, node_id: str) -> NodeSnapshot:
        return build_snapshot(
            self._stats[node_id],
            self._quality.get(node_id),
            self.health.state(node_id),
            self.in_flight(node_id),
        )

    def _rebuild(self, node_id: str) -> None:
        cols, row = self._row[node_id]
        cols.set_row(row, self._snapshot(node_id))

    def _rebuild_all(self) -> None:
        by_model: dict[str, list[NodeSnapshot]] = {}
        for node_id, s in self._stats.items():
            by_model.setdefault(s.model_id, []).append(self._snapshot(node_id))
        self._cols = {m: Columns(snaps) for m, snaps in by_model.items()}
        self._row = {nid: (c, i) for c in self._cols.values() for i, nid in enumerate(c.ids)}


__all__ = ["NoEligibleNode", "Router", "build_snapshot"]
