"""Built-in scorers: each returns one score per candidate, higher is better, meant to lie in [0,1].

The framework clamps (out-of-range or NaN values cannot dominate a decision) and applies the
profile's weights; scorers never see each other's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routing.router.framework import PickContext, Scorer, register
from routing.router.snapshot import NodeSnapshot, RequestFacts, stable_hash


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QualityParams(_Params):
    unscored: float = Field(
        default=0.5, ge=0, le=1, description="Score given to a node validators have not scored yet."
    )


@register("quality")
class Quality(Scorer):
    """The validators' consensus quality score as is.

    Reads: quality. Parameters: unscored.
    Example: `{name: quality, type: quality, parameters: {unscored: 0.5}}`
    """

    Params = QualityParams

    def score(self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext) -> list[float]:
        unscored = self.params.unscored
        return [unscored if n.quality is None else n.quality for n in nodes]

    def score_idx(self, facts, cols, idx, ctx):
        q = cols.quality[idx]
        return np.where(np.isnan(q), self.params.unscored, q)


class LoadParams(_Params):
    max_load: float = Field(
        default=2.0,
        gt=0,
        description="Load (in_flight / capacity) at which the score reaches 0; above 1.0 requests queue, so "
        "a value above 1 keeps queued nodes distinguishable.",
    )


@register("load")
class Load(Scorer):
    """1 - in_flight / (capacity * max_load): an H100 with 8 of 32 slots busy beats an L4 with 4 of 8.

    Reads: in_flight, capacity. Parameters: max_load.
    Example: `{name: load, type: load, parameters: {max_load: 2.0}}`
    """

    Params = LoadParams

    def score(self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext) -> list[float]:
        m = self.params.max_load
        return [1.0 - n.in_flight / (n.capacity * m) for n in nodes]

    def score_idx(self, facts, cols, idx, ctx):
        return 1.0 - cols.in_flight[idx] / (cols.capacity[idx] * self.params.max_load)


class LatencyParams(_Params):
    output_tokens: float = Field(
        default=256, ge=0, description="Output length assumed when predicting a request's latency (tokens)."
    )
    unknown: float = Field(
        default=0.5, ge=0, le=1, description="Score of a node with no latency observations yet."
    )
    queueing: bool = Field(
        default=True,
        description="Stretch the prediction by the node's queue: x (1 + max(0, in_flight - capacity + 1) / "
        "capacity), so a fast but full node stops attracting traffic it can only queue.",
    )


@register("latency")
class Latency(Scorer):
    """Predicted latency from the EWMAs, relative to the best candidate: best / own (in (0,1]).

    Prediction = ttft_ewma + tpot_ewma * output_tokens, optionally stretched by queueing.
    Relative scores make the scorer unit-free: a fleet of 10 ms nodes and one of 1 s nodes
    score alike. Reads: ttft_ewma_s, tpot_ewma_s, in_flight, capacity.
    Parameters: output_tokens, unknown, queueing.
    Example: `{name: latency, type: latency, parameters: {output_tokens: 256}}`
    """

    Params = LatencyParams

    def score(self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext) -> list[float]:
        p = self.params
        k = p.output_tokens
        inf = math.inf  # unknown latency; min() then runs at C speed without a None check
        if p.queueing:  # a full node's prediction grows with the requests queued ahead
            preds = [
                inf
                if n.ttft_ewma_s is None or n.tpot_ewma_s is None
                else (n.ttft_ewma_s + n.tpot_ewma_s * k)
                * (1.0 if n.in_flight < n.capacity else 1.0 + (n.in_flight - n.capacity + 1) / n.capacity)
                for n in nodes
            ]
        else:
            preds = [
                inf if n.ttft_ewma_s is None or n.tpot_ewma_s is None else n.ttft_ewma_s + n.tpot_ewma_s * k
                for n in nodes
            ]
        best = min(preds)
        unknown = p.unknown
        if best == inf:
            return [unknown] * len(nodes)
        if best <= 0.0:
            return [unknown if x == inf else (1.0 if x <= 0.0 else 0.0) for x in preds]
        return [unknown if x == inf else best / x for x in preds]

    def score_idx(self, facts, cols, idx, ctx):
        p = self.params
        pred = cols.ttft[idx] + cols.tpot[idx] * p.output_tokens  # NaN when unknown
        if p.queueing:
            inf, cap = cols.in_flight[idx], cols.capacity[idx]
            pred = pred * np.where(inf < cap, 1.0, 1.0 + (inf - cap + 1.0) / cap)
        unknown = np.isnan(pred)
        if unknown.all():
            return np.full(idx.size, p.unknown)
        best = np.nanmin(pred)
        if best <= 0.0:
            return np.where(unknown, p.unknown, np.where(pred <= 0.0, 1.0, 0.0))
        with np.errstate(invalid="ignore"):
            return np.where(unknown, p.unknown, best / pred)


class AffinityParams(_Params):
    max_load: float = Field(
        default=0.8,
        gt=0,
        description="A node at or above this load (in_flight / capacity) loses affinity, so a hot session "
        "spills to the next node in its rendezvous order instead of queueing.",
    )
    use_prefix: bool = Field(
        default=True, description="Fall back to the prompt-prefix hash when the request has no session key."
    )


@register("affinity")
class Affinity(Scorer):
    """Rendezvous (highest-random-weight) hashing of the session key or prompt prefix over nodes.

    The not-overloaded node with the highest hash(key, node) scores 1, every other node 0, so the
    same session/prefix returns to the same node (warm KV cache) while that node has room, and
    adding or removing a node only moves the keys that node owned. Stable across processes.
    Reads: node_id, in_flight, capacity. Parameters: max_load, use_prefix.
    Example: `{name: affinity, type: affinity, parameters: {max_load: 0.8}}`
    """

    Params = AffinityParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        self._last_key: tuple[str, float] = ("", 0.0)

    def _key_hash(self, key: str) -> float:
        # One blake2b per distinct key; consecutive requests of a session reuse it.
        if self._last_key[0] != key:
            self._last_key = (key, stable_hash(key) * 1e7)
        return self._last_key[1]

    def score(self, facts: RequestFacts, nodes: Sequence[NodeSnapshot], ctx: PickContext) -> list[float]:
        key = facts.session_key
        if key is None:
            key = facts.prefix_hash if self.params.use_prefix else ""
        out = [0.0] * len(nodes)
        if not key:
            return out
        k = self._key_hash(key)
        m = self.params.max_load
        # Rendezvous weight = frac(key x node x 1e7), both hashes in (0,1): one float multiply per
        # node (4x cheaper than integer mixing), as evenly spread as splitmix64 in our tests, and
        # ~29 bits of resolution, so ties are negligible. Same in every gateway process.
        weights = [(k * n._key) % 1.0 if n.in_flight < m * n.capacity else -1.0 for n in nodes]
        best = max(weights)
        if best >= 0:
            out[weights.index(best)] = 1.0
        return out

    def score_idx(self, facts, cols, idx, ctx):
        key = facts.session_key
        if key is None:
            key = facts.prefix_hash if self.params.use_prefix else ""
        out = np.zeros(idx.size)
        if not key:
            return out
        weights = (self._key_hash(key) * cols.key[idx]) % 1.0
        weights[cols.in_flight[idx] >= self.params.max_load * cols.capacity[idx]] = -1.0
        j = int(np.argmax(weights))
        if weights[j] >= 0:
            out[j] = 1.0
        return out
