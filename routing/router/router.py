"""The Router: compiled profiles + node health + a cached snapshot of the fleet.

Two layers, both used by the gateway and by benchmarks.fleet:
- `pick(facts, snapshots, ...)` is the pure decision: given snapshots, return a Decision.
- The fleet view (`update_nodes`, `update_quality`, `begin`/`end`, `observe_*`) keeps one
  immutable NodeSnapshot per node up to date, so `route(facts)` costs a dictionary lookup plus
  the decision. Background refreshes feed it; the hot path never makes a remote call.
Not thread-safe: call it from one event loop (the gateway's), as Serve replicas do.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from cluster.records import NodeStats, QualityScores
from routing.router.columns import Columns
from routing.router.config import DEFAULT_PROFILE_PATH, RouterConfig, build_profiles, load_config
from routing.router.framework import PickContext, PluginTimings, Profile
from routing.router.health import HealthCollector, NodeHealth, NodeHealthState
from routing.router.snapshot import (
    Decision,
    NodeSnapshot,
    NoEligibleNode,
    RequestFacts,
    stable_hash,
    trusted_snapshot,
)


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
    `router.collector` yourself. Models with at least `columns_from` nodes are routed over numpy
    columns (same decisions, see routing/router/columns.py), smaller ones over plain lists, which
    are faster below ~100 nodes.
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        registry=None,
        columns_from: int = 200,
    ) -> None:
        self.config = config
        self.columns_from = columns_from
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
        self._snap: dict[str, NodeSnapshot] = {}
        # Per model, the snapshots in a list updated in place (O(1) per begin/end), plus each
        # node's position in it; snapshots() hands out a tuple copy (one C-level memcpy).
        self._by_model: dict[str, list[NodeSnapshot]] = {}
        self._pos: dict[str, int] = {}
        self._keys: dict[str, float] = {}
        self._cols: dict[str, Columns] = {}

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
        if exclude:
            snapshots = [n for n in snapshots if n.node_id not in exclude]
        ctx = PickContext(self.clock() if now is None else now, self.rng)
        return prof.run(facts, snapshots, ctx, self.timings, explain)

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
    ) -> Decision:
        """`pick` over the router's own snapshots of the nodes serving `facts.model`."""
        snaps = self._by_model.get(facts.model, ())
        if len(snaps) >= self.columns_from:
            prof = self._profile(facts, profile)
            if prof.vectorised:
                cols = self._cols.get(facts.model)
                if cols is None:
                    cols = self._cols[facts.model] = Columns(facts.model, snaps)
                ctx = PickContext(self.clock(), self.rng)
                return prof.run_columns(facts, cols, cols.rows(exclude), ctx, self.timings, explain)
        return self.pick(facts, tuple(snaps), exclude, profile, explain)

    def snapshots(self, model: str | None = None) -> tuple[NodeSnapshot, ...]:
        """Current snapshots of the nodes serving `model` (all nodes when None)."""
        if model is None:
            return tuple(self._snap.values())
        return tuple(self._by_model.get(model, ()))

    def update_nodes(self, stats: Iterable[NodeStats]) -> None:
        """Replace the node list with the registry's latest stats (background refresh)."""
        fresh = {s.node_id: s for s in stats}
        for node_id, s in fresh.items():
            self._others[node_id] = max(0, s.in_flight - self._local.get(node_id, 0))
        self._stats = fresh
        self.health.forget(fresh)
        for gone in [n for n in self._local if n not in fresh and self._local[n] == 0]:
            del self._local[gone]
        self._rebuild_all()

    def update_quality(self, scores: QualityScores | Mapping[str, float]) -> None:
        """Replace the consensus quality scores (nodes absent from them are unscored)."""
        quality = scores.quality if isinstance(scores, QualityScores) else scores
        for node_id, q in quality.items():
            if not 0.0 <= q <= 1.0:  # also rejects NaN
                raise ValueError(f"quality of {node_id!r} must be in [0,1], got {q!r}")
        self._quality = dict(quality)
        self._rebuild_all()

    def begin(self, node_id: str) -> None:
        """A request was sent to `node_id` (counts toward its load)."""
        self._local[node_id] = self._local.get(node_id, 0) + 1
        self._rebuild(node_id)

    def end(self, node_id: str) -> None:
        """A request on `node_id` finished, failed or was cancelled."""
        self._local[node_id] = max(0, self._local.get(node_id, 0) - 1)
        self._rebuild(node_id)

    def observe_success(self, node_id: str, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """An attempt on `node_id` succeeded: clear its ban, update its TTFT / per-token EWMAs (seconds)."""
        self.health.success(node_id, ttft_s, tpot_s)
        self._rebuild(node_id)

    def observe_failure(self, node_id: str, now: float | None = None) -> float:
        """An attempt failed or timed out: ban `node_id` with backoff. Returns when the ban ends."""
        until = self.health.failure(node_id, now)
        self._rebuild(node_id)
        return until

    def timeout_s(self, node_id: str) -> float:
        """First-byte timeout to use for `node_id` (seconds)."""
        return self.health.timeout_s(node_id)

    def in_flight(self, node_id: str) -> int:
        return self._local.get(node_id, 0) + self._others.get(node_id, 0)

    def _rebuild(self, node_id: str) -> None:
        s = self._stats.get(node_id)
        if s is None:
            return  # not (or no longer) registered: outcomes are still kept in health
        h = self.health.state(node_id)
        key = self._keys.get(node_id)
        if key is None:
            key = self._keys[node_id] = stable_hash(node_id)
        # Same fields as build_snapshot(), without re-validating inputs that are validated already.
        snap = trusted_snapshot(
            s.node_id,
            s.model_id,
            s.accelerator_type,
            s.capacity * max(1, s.running_replicas),
            s.live,
            self.in_flight(node_id),
            0,
            h.ttft_ewma_s,
            h.tpot_ewma_s,
            h.error_streak,
            h.banned_until,
            h.last_failure_at,
            self._quality.get(node_id),
            s.joined_at,
            key,
        )
        self._snap[node_id] = snap
        pos = self._pos.get(node_id)
        if pos is None:
            models = self._by_model.setdefault(s.model_id, [])
            self._pos[node_id] = len(models)
            models.append(snap)
        else:
            self._by_model[s.model_id][pos] = snap
            cols = self._cols.get(s.model_id)
            if cols is not None:
                cols.set_row(pos, snap)
            return
        self._cols.pop(s.model_id, None)  # a new row: rebuilt on the next route()

    def _rebuild_all(self) -> None:
        self._snap, self._by_model, self._pos, self._cols = {}, {}, {}, {}
        for node_id in self._stats:
            self._rebuild(node_id)


__all__ = ["NoEligibleNode", "Router", "build_snapshot"]
