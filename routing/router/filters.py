"""Built-in filters: each narrows the candidate list, in the order the profile lists them.

Order matters. Put `serves-model` first: later filters (`not-banned`'s never-ban-everyone rule,
`probation`'s share) reason about "the nodes of this model". Then the hard filters that may
empty the list (`live`, `quality-floor`, `target-node`), then the soft ones that always keep
someone (`not-banned`, `probation`, `under-saturation`): a soft filter's fallback choice must
not be removed by a hard filter after it (the property test in tests/unit found exactly that).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routing.router.framework import Filter, PickContext, register
from routing.router.snapshot import NodeSnapshot, RequestFacts


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@register("serves-model")
class ServesModel(Filter):
    """Keeps nodes whose `model_id` is the model the request asks for.

    Reads: model_id. Parameters: none.  Example: `{name: serves-model, type: serves-model}`
    """

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        model = facts.model
        return [n for n in nodes if n.model_id == model]

    def filter_idx(self, facts, cols, idx, ctx):
        return idx if cols.model == facts.model else idx[:0]


@register("live")
class Live(Filter):
    """Keeps nodes the registry reports as live (a running replica).

    Reads: live. Parameters: none.  Example: `{name: live, type: live}`
    """

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        return [n for n in nodes if n.live]

    def filter_idx(self, facts, cols, idx, ctx):
        return idx[cols.live[idx]]


@register("not-banned")
class NotBanned(Filter):
    """Drops nodes whose failure ban has not expired yet, but never all of them.

    If every candidate is banned, the one that failed least recently stays eligible: a model
    whose nodes all hiccuped at once must still be served (Petals' "never ban everyone").
    Reads: banned_until, last_failure_at. Parameters: none.
    Example: `{name: not-banned, type: not-banned}`
    """

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        now = ctx.now
        kept = [n for n in nodes if n.banned_until <= now]
        if kept or not nodes:
            return kept
        return [min(nodes, key=lambda n: (n.last_failure_at or 0.0, n.banned_until))]

    def filter_idx(self, facts, cols, idx, ctx):
        kept = idx[cols.banned_until[idx] <= ctx.now]
        if kept.size or not idx.size:
            return kept
        order = np.lexsort((cols.banned_until[idx], cols.last_failure_at[idx]))  # last key is primary
        return idx[order[:1]]


class SaturationParams(_Params):
    max_load: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description="Drop nodes whose (in_flight + queue_depth) / capacity is at or above this "
        "(1.0 = every slot busy; above it requests queue on the node).",
    )
    keep_all_when_saturated: bool = Field(
        default=True,
        description="When every candidate is saturated keep them all (scorers then pick the least bad); "
        "false makes the router raise NoEligibleNode so the gateway can shed load.",
    )


@register("under-saturation")
class UnderSaturation(Filter):
    """Drops nodes at or above their saturation limit, normalised by capacity.

    Reads: in_flight, queue_depth, capacity. Parameters: max_load, keep_all_when_saturated.
    Example: `{name: not-saturated, type: under-saturation, parameters: {max_load: 1.0}}`
    """

    Params = SaturationParams

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        limit = self.params.max_load
        kept = [n for n in nodes if n.in_flight + n.queue_depth < limit * n.capacity]
        if not kept and self.params.keep_all_when_saturated:
            return list(nodes)
        return kept

    def filter_idx(self, facts, cols, idx, ctx):
        kept = idx[cols.in_flight[idx] + cols.queue_depth[idx] < self.params.max_load * cols.capacity[idx]]
        if not kept.size and self.params.keep_all_when_saturated:
            return idx
        return kept


class FloorParams(_Params):
    floor: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Minimum consensus quality; scored nodes below it get no traffic.",
    )


@register("quality-floor")
class QualityFloor(Filter):
    """Drops scored nodes whose quality is below the floor; unscored nodes pass (probation decides).

    Reads: quality. Parameters: floor.
    Example: `{name: quality-floor, type: quality-floor, parameters: {floor: 0.5}}`
    """

    Params = FloorParams

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        floor = self.params.floor
        return [n for n in nodes if n.quality is None or n.quality >= floor]

    def filter_idx(self, facts, cols, idx, ctx):
        q = cols.quality[idx]
        return idx[np.isnan(q) | (q >= self.params.floor)]


class ProbationParams(_Params):
    share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Fraction of decisions that go to nodes on probation when both kinds are eligible.",
    )
    new_for_s: float = Field(
        default=0.0,
        ge=0,
        description="A scored node also counts as on probation for this long after it joined (0 = only "
        "unscored nodes are on probation).",
    )


@register("probation")
class Probation(Filter):
    """Bounds the traffic share of nodes on probation (unscored, or joined recently).

    With probability `share` the candidates narrow to the probation nodes, otherwise to the
    scored ones; when only one kind is eligible it keeps that kind, so a fleet of brand-new
    nodes still serves. New nodes thus earn the validator samples they need without
    exposing more than `share` of organic traffic to an unproven node.
    Reads: quality, joined_at. Parameters: share, new_for_s.
    Example: `{name: probation, type: probation, parameters: {share: 0.05}}`
    """

    Params = ProbationParams

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        cutoff = ctx.now - self.params.new_for_s
        proven = [n for n in nodes if n.quality is not None and n.joined_at <= cutoff]
        if len(proven) == len(nodes) or not proven:
            return list(nodes)
        if ctx.rng.random() < self.params.share:
            ids = {n.node_id for n in proven}
            return [n for n in nodes if n.node_id not in ids]
        return proven

    def filter_idx(self, facts, cols, idx, ctx):
        proven = ~np.isnan(cols.quality[idx]) & (cols.joined_at[idx] <= ctx.now - self.params.new_for_s)
        count = int(proven.sum())
        if count == idx.size or not count:
            return idx
        return idx[~proven] if ctx.rng.random() < self.params.share else idx[proven]


@register("target-node")
class TargetNode(Filter):
    """For requests that name a node (validator challenges), keeps only that node.

    Requests without `target_node` pass unchanged. Reads: node_id. Parameters: none.
    Example: `{name: target-node, type: target-node}`
    """

    def filter(
        self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext
    ) -> list[NodeSnapshot]:
        target = facts.target_node
        if target is None:
            return list(nodes)
        return [n for n in nodes if n.node_id == target]

    def filter_idx(self, facts, cols, idx, ctx):
        if facts.target_node is None:
            return idx
        return idx[idx == cols.pos.get(facts.target_node, -1)]
