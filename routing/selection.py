"""The gateway's routing step: a live view of the nodes plus the router's decision.

The gateway calls `pick` on every request, so it touches only local state: node stats and
scores arrive through `update_nodes` / `update_quality` from background refreshes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cluster.records import NodeStats, QualityScores


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the router may know about a request (never the request object itself)."""

    model: str
    prompt_chars: int
    prefix_hash: str
    session_key: str | None = None
    pinned_node: str | None = None
    is_challenge: bool = False

    @classmethod
    def of(cls, body: Any, session_key: str | None = None, pinned: str | None = None) -> "RequestFacts":
        if hasattr(body, "messages"):
            text = "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in body.messages)
        else:
            text = str(body.prompt)
        prefix = hashlib.blake2b(text[:256].encode(), digest_size=8).hexdigest()
        return cls(body.model, len(text), prefix, session_key, pinned, pinned is not None)


class NodeSelector:
    """Least-in-flight among live nodes of the model, normalised by capacity (foundation router)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeStats] = {}
        self._in_flight: dict[str, int] = {}
        self._quality: dict[str, float] = {}

    def update_nodes(self, stats: list[NodeStats]) -> None:
        self._nodes = {s.node_id: s for s in stats}

    def update_quality(self, scores: QualityScores) -> None:
        self._quality = dict(scores.quality)

    def set_in_flight(self, node_id: str, n: int) -> None:
        self._in_flight[node_id] = n

    def pick(self, facts: RequestFacts, exclude: set[str] | frozenset[str] = frozenset()) -> NodeStats | None:
        if facts.pinned_node is not None:
            node = self._nodes.get(facts.pinned_node)
            ok = node is not None and node.live and node.model_id == facts.model
            return node if ok and node.node_id not in exclude else None
        best, best_load = None, float("inf")
        for node in self._nodes.values():
            if not node.live or node.model_id != facts.model or node.node_id in exclude:
                continue
            load = self._in_flight.get(node.node_id, 0) / node.capacity
            if load < best_load:
                best, best_load = node, load
        return best

    def observe_success(self, node_id: str, ttft_s: float | None, tpot_s: float | None) -> None:
        pass

    def observe_failure(self, node_id: str) -> None:
        pass


def load_selector(config_path: str | None = None) -> NodeSelector:
    return NodeSelector()
