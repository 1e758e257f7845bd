"""Built-in filters: each narrows the candidates (a boolean row mask), in the order the profile lists them.

Order matters. Put `serves-model` first: later filters (`not-banned`'s never-ban-everyone rule,
`probation`'s share) reason about "the nodes of this model". Then the hard filters that may
empty the list (`live`, `quality-floor`, `target-node`), then the soft ones that always keep
someone (`not-banned`, `probation`, `under-saturation`, `ttft-slo`): a soft filter's fallback choice must
not be removed by a hard filter after it (the property test in tests/unit found exactly that).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routing.router.columns import Columns
from routing.router.framework import Filter, PickContext, register
from routing.router.snapshot import RequestFacts


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@register("serves-model")
class ServesModel(Filter):
    """Keeps nodes whose `model_id` is the model the request asks for.

    Reads: model_id. Parameters: none.  Example: `{name: serves-model, type: serves-model}`
    """

    static, reads = True, ("model",)

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        return mask & (cols.model == facts.model)


@register("live")
class Live(Filter):
    """Keeps nodes the registry reports as live (a running replica).

    Reads: live. Parameters: none.  Example: `{name: live, type: live}`
    """

    static, reads = True, ("live",)

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        return mask & cols.live


@register("not-banned")
class NotBanned(Filter):
    """Drops nodes whose failure ban has not expired yet, but never all of them.

    If every candidate is banned, the one that failed least recently stays eligible: a model
    whose nodes all hiccuped at once must still be served (Petals' "never ban everyone").
    Reads: banned_until, last_failure_at. Parameters: none.
    Example: `{name: not-banned, type: not-banned}`
    """

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        kept = mask & (cols.banned_until <= ctx.now)
        if np.count_nonzero(kept) or not np.count_nonzero(mask):
            return kept
        idx = np.flatnonzero(mask)
        order = np.lexsort((cols.banned_until[idx], cols.last_failure_at[idx]))  # last key is primary
        kept[idx[order[0]]] = True
        return kept


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

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        kept = mask & (cols.in_flight + cols.queue_depth < self.params.max_load * cols.capacity)
        if self.params.keep_all_when_saturated and not np.count_nonzero(kept):
            return mask
        return kept


class FloorParams(_Params):
    floor: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Minimum consensus quality; scored nodes below it get no traffic.",
    )
    serve_best_when_all_below: bool = Field(
        default=True,
        description="When every candidate is scored below the floor, serve the best-scored ones instead "
        "of refusing (a degraded decision: header x-meritnet-degraded, metric, log line). Validators that "
        "misjudge honest hardware must not black out the endpoint; a model whose every node really cheats "
        "still earns nothing (settlement pays usage x quality). False: refuse with 503.",
    )


@register("quality-floor")
class QualityFloor(Filter):
    """Drops scored nodes whose quality is below the floor; unscored nodes pass (probation decides).
    When that would drop every candidate, keeps the best-scored ones (a degraded decision) unless
    `serve_best_when_all_below` is false.

    Reads: quality. Parameters: floor, serve_best_when_all_below.
    Example: `{name: quality-floor, type: quality-floor, parameters: {floor: 0.5}}`
    """

    Params = FloorParams
    static, reads = True, ("quality",)

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        q = cols.quality
        return mask & (np.isnan(q) | (q >= self.params.floor))

    def fallback(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext):
        if not self.params.serve_best_when_all_below:
            return None
        q = np.where(mask, cols.quality, -np.inf)  # every candidate is scored here (unscored pass)
        return mask & (q == q.max())


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

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        proven = mask & ~np.isnan(cols.quality)
        if self.params.new_for_s:
            proven &= cols.joined_at <= ctx.now - self.params.new_for_s
        count = np.count_nonzero(proven)
        if not count or count == np.count_nonzero(mask):
            return mask
        return mask & ~proven if ctx.rng.random() < self.params.share else proven


@register("target-node")
class TargetNode(Filter):
    """For requests that name a node (validator challenges), keeps only that node.

    Requests without `target_node` pass unchanged. Reads: node_id. Parameters: none.
    Example: `{name: target-node, type: target-node}`
    """

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        if facts.target_node is None:
            return mask
        kept = np.zeros_like(mask)
        row = cols.pos.get(facts.target_node)
        if row is not None:
            kept[row] = mask[row]
        return kept


class SloParams(_Params):
    output_tokens: float = Field(
        default=256,
        ge=0,
        description="Output length assumed for the requests ahead in a full node's queue (tokens). Their "
        "own lengths are not known to this request; its own max_tokens does not delay its first token.",
    )


@register("ttft-slo")
class TtftSlo(Filter):
    """For requests with a TTFT target (`x-slo-ttft-ms`), drops nodes predicted to miss it.

    Predicted TTFT = the node's TTFT EWMA, plus, when every slot is busy, the wait for one:
    (in_flight - capacity + 1) / capacity x (ttft + tpot x output_tokens). Nodes never timed
    pass (no evidence they miss). When no candidate is predicted to meet the target all of them
    are kept (the target is best effort: the scorers then prefer the fastest), so a tight SLO
    never turns into an error. Requests without a target pass unchanged.
    Reads: ttft_ewma_s, tpot_ewma_s, in_flight, capacity. Parameters: output_tokens.
    Example: `{name: slo, type: ttft-slo, parameters: {output_tokens: 256}}`
    """

    Params = SloParams

    def filter(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        target = facts.slo_ttft_s
        if target is None:
            return mask
        ttft, cap = cols.ttft, cols.capacity
        ahead = np.fmax(cols.in_flight - cap + 1.0, 0.0) / cap
        pred = ttft + ahead * (ttft + cols.tpot * self.params.output_tokens)
        kept = mask & ~(pred > target)  # NaN (never timed) is not > target: kept
        return kept if np.count_nonzero(kept) else mask
