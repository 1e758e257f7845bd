"""Built-in scorers: each returns one score per candidate, higher is better, meant to lie in [0,1].

The framework clamps (out-of-range or NaN values cannot dominate a decision) and applies the
profile's weights; scorers never see each other's output.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from routing.router.columns import Columns
from routing.router.framework import PickContext, Scorer, register
from routing.router.snapshot import RequestFacts, stable_hash


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
    static, reads = True, ("quality",)

    def score(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        q = cols.quality
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

    def score(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        return 1.0 - cols.in_flight / (cols.capacity * self.params.max_load)


class LatencyParams(_Params):
    output_tokens: float = Field(
        default=256,
        ge=0,
        description="Output length assumed for a request that set no max_tokens (tokens); a request that "
        "did is predicted at its own max_tokens x n.",
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

    Prediction = ttft_ewma + tpot_ewma * output tokens (the request's max_tokens x n, else the
    `output_tokens` parameter), optionally stretched by queueing.
    Relative scores make the scorer unit-free: a fleet of 10 ms nodes and one of 1 s nodes
    score alike. Reads: ttft_ewma_s, tpot_ewma_s, in_flight, capacity.
    Parameters: output_tokens, unknown, queueing.
    Example: `{name: latency, type: latency, parameters: {output_tokens: 256}}`
    """

    Params = LatencyParams
    bounded = True

    def score(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        p = self.params
        out = p.output_tokens if facts.output_tokens is None else facts.output_tokens
        # Prediction before queueing, inf when never timed: at the default length, recomputed only when
        # an EWMA changes (a request's own length is one vector operation over the nodes).
        if out == p.output_tokens:
            base = cols.memo(
                ("latency", self.name),
                ("ttft", "tpot"),
                lambda: np.nan_to_num(cols.ttft + cols.tpot * p.output_tokens, nan=np.inf),
            )
        else:
            base = np.nan_to_num(cols.ttft + cols.tpot * out, nan=np.inf)
        pred = base
        if p.queueing:
            cap = cols.capacity
            pred = base * (1.0 + np.fmax(cols.in_flight - cap + 1.0, 0.0) / cap)
        best = float(np.min(pred, where=mask, initial=np.inf))
        if best == np.inf:
            return np.full(cols.size, p.unknown)
        unknown = base == np.inf
        if best <= 0.0:
            return np.where(unknown, p.unknown, np.where(pred <= 0.0, 1.0, 0.0))
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
    bounded = True

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        self._hashes: dict[str, float] = {}

    def _key_hash(self, key: str) -> float:
        # One blake2b per distinct key, remembered for the next 4,096 distinct keys.
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= 4096:
                self._hashes.clear()
            h = self._hashes[key] = stable_hash(key) * 1e7
        return h

    def score(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        key = facts.session_key
        if key is None:
            key = facts.prefix_hash if self.params.use_prefix else ""
        out = np.zeros(cols.size)
        if not key:
            return out
        weights = (self._key_hash(key) * cols.key) % 1.0
        weights[~mask | (cols.in_flight >= self.params.max_load * cols.capacity)] = -1.0
        j = int(np.argmax(weights))
        if weights[j] >= 0:
            out[j] = 1.0
        return out


class PrefixParams(_Params):
    max_load: float = Field(
        default=1.0,
        gt=0,
        description="A node at or above this load (in_flight / capacity) scores 0: a warm cache is not worth "
        "queueing for, so a hot prefix spills to other nodes (which then warm up too).",
    )
    index_entries: int = Field(
        default=100_000, ge=1, description="Block hashes the router remembers (LRU), bounding its memory."
    )
    holders: int = Field(default=4, ge=1, description="Most recent nodes remembered per block hash.")


@register("prefix-cache")
class PrefixCache(Scorer):
    """Prefers the node most likely to hold the prompt's leading KV blocks in its prefix cache.

    The router cannot see the nodes' caches, so it remembers where it sent each prefix (like
    llm-d's approximate prefix-cache scorer and Ray Serve LLM's prefix-aware router): after a
    decision, the request's block hashes (`facts.prefix_blocks`, chained, so block i's hash
    stands for blocks 0..i) point to the chosen node. Only blocks at positions 1, 2, 4, 8, ...
    and the last are indexed and looked up: a match at position i implies the whole prefix up
    to i, so ~7 lookups score a 64-block prompt. Score = matched blocks / the request's blocks,
    0 at or above `max_load`. Stale entries (a node evicted or restarted) only cost a cache miss.
    Reads: prefix_blocks, in_flight, capacity. Parameters: max_load, index_entries, holders.
    Example: `{name: prefix, type: prefix-cache, parameters: {max_load: 1.0}}`
    """

    Params = PrefixParams
    bounded = True

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        self._index: OrderedDict[int, dict[str, None]] = OrderedDict()

    @staticmethod
    def _checkpoints(n: int) -> list[int]:
        points, i = [], 1
        while i < n:
            points.append(i - 1)
            i *= 2
        if n:
            points.append(n - 1)
        return points

    def score(self, facts: RequestFacts, cols: Columns, mask: np.ndarray, ctx: PickContext) -> np.ndarray:
        out = np.zeros(cols.size)
        blocks = facts.prefix_blocks
        if not blocks:
            return out
        index, pos, n = self._index, cols.pos, len(blocks)
        for c in self._checkpoints(n):  # shallow to deep: a deeper match overwrites
            holders = index.get(blocks[c])
            if holders is None:
                break  # chained hashes: nobody holds a deeper block either
            for node_id in holders:
                row = pos.get(node_id)
                if row is not None:
                    out[row] = (c + 1) / n
        out[cols.in_flight >= self.params.max_load * cols.capacity] = 0.0
        return out

    def after_pick(self, facts: RequestFacts, node_id: str, ctx: PickContext) -> None:
        blocks = facts.prefix_blocks
        if not blocks:
            return
        index, keep = self._index, self.params.holders
        for c in self._checkpoints(len(blocks)):
            holders = index.get(blocks[c])
            if holders is None:
                holders = index[blocks[c]] = {}
            else:
                index.move_to_end(blocks[c])
                holders.pop(node_id, None)
            holders[node_id] = None  # most recent last
            if len(holders) > keep:
                del holders[next(iter(holders))]
        while len(index) > self.params.index_entries:
            index.popitem(last=False)
