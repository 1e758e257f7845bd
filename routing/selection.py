"""The gateway's routing step: the quality-aware Router over a live view of the nodes.

The gateway calls `pick` on every request, so it touches only local state; node stats and
scores arrive through `update_nodes` / `update_quality` from background refreshes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.records import NodeStats, QualityScores
from routing import metrics
from routing.errors import APIError
from routing.intake import chat_messages, int_field, is_embedding, max_tokens, prompts
from routing.router import NoEligibleNode, RequestFacts, Router

log = logging.getLogger(__name__)

SLO_HEADER = "x-slo-ttft-ms"
SLO_MAX_MS = 600_000.0  # 10 minutes: longer than any first-byte timeout, so larger values mean nothing


def slo_ttft_s(headers: Mapping[str, str]) -> float | None:
    """The client's time-to-first-token target from `x-slo-ttft-ms` (milliseconds, a positive number
    up to 600,000), in seconds; None without the header. Anything else is the client's error: 400."""
    raw = headers.get(SLO_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw.strip()) if len(raw) <= 32 else math.nan
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and 0 < ms <= SLO_MAX_MS):
        raise APIError(
            400,
            f"The {SLO_HEADER} header must be a number of milliseconds in (0, {SLO_MAX_MS:,.0f}], "
            "e.g. 'x-slo-ttft-ms: 500'. Remove it to route without a latency target.",
            type="invalid_request_error",
            param=SLO_HEADER,
            code="invalid_slo_header",
        )
    return ms / 1000.0


def facts_for(body: Any, headers: Mapping[str, str], target_node: str | None = None) -> RequestFacts:
    """Routing facts of a validated Chat/Completion/EmbeddingRequest and its headers (never the request
    itself).

    Raises APIError(400) for a malformed `x-slo-ttft-ms` header."""
    messages = chat_messages(body)
    if messages is not None:
        text = "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in messages)
    else:
        items = prompts(body)
        text = items[0] if len(items) == 1 and isinstance(items[0], str) else str(items)
    return RequestFacts.from_text(
        body.model,
        text,
        session_key=headers.get("x-session-id"),
        is_challenge=target_node is not None,
        target_node=target_node,
        slo_ttft_s=slo_ttft_s(headers),
        output_tokens=output_tokens(body),
    )


def output_tokens(body: Any) -> int | None:
    """The most a request may generate: its max_completion_tokens or max_tokens, times n (None: no limit
    set, the engine's default applies); an embeddings request generates nothing."""
    if is_embedding(body):
        return 0
    limit = max_tokens(body)
    return None if limit is None or limit < 0 else limit * (int_field(body, "n") or 1)


@dataclass(frozen=True, slots=True)
class Pick:
    """The chosen node, and the filters whose refusal was overridden by their fallback (empty: a normal
    decision). A degraded pick is said aloud: a response header, a metric, a log line, /status."""

    node: NodeStats
    degraded: tuple[str, ...] = ()


class NodeSelector:
    """Adapter the gateway talks to: Router decisions, returned as a Pick of the chosen node's NodeStats."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._stats: dict[str, NodeStats] = {}
        self._warned: dict[str, float] = {}  # cause of a refusal -> when it was last logged
        self.degraded: dict[
            str, tuple[float, str]
        ] = {}  # model -> (unix time, filter) of its last degraded pick

    def update_nodes(self, stats: list[NodeStats]) -> None:
        self._stats = {s.node_id: s for s in stats}
        self.router.update_nodes(stats)

    def update_quality(self, scores: QualityScores) -> None:
        self.router.update_quality(scores)

    def pick(self, facts: RequestFacts, exclude: set[str] | frozenset[str] = frozenset()) -> Pick | None:
        try:
            decision = self.router.route(facts, exclude=exclude)
        except NoEligibleNode as exc:
            metrics.NO_NODE.labels(facts.model, exc.stage).inc()
            if exc.stage != "excluded":
                self._warn(exc.stage, "%s", exc)
            return None
        node = self._stats.get(decision.node_id)
        if node is None:
            return None
        for stage in decision.degraded:
            metrics.DEGRADED.labels(facts.model, stage).inc()
            self.degraded[facts.model] = (time.time(), stage)
            self._warn(
                f"degraded:{stage}",
                "filter %r would have refused every node of model %r; serving the best remaining node %s "
                "instead (check the validators' scores on /status)",
                stage,
                facts.model,
                node.node_id,
            )
        return Pick(node, decision.degraded)

    def has_candidate(self, facts: RequestFacts, exclude: set[str] | frozenset[str] = frozenset()) -> bool:
        """Whether a node other than `exclude` could take the request now. Asked while waiting on a slow
        node, so it counts and logs nothing: neither a refusal nor a degraded pick happened."""
        try:
            return self.router.route(facts, exclude=exclude).node_id in self._stats
        except NoEligibleNode:
            return False

    def _warn(self, cause: str, msg: str, *args) -> None:
        """A warning at most once per 10 s per cause."""
        if time.monotonic() - self._warned.get(cause, -math.inf) > 10:
            self._warned[cause] = time.monotonic()
            log.warning(msg, *args)

    def begin(self, node_id: str) -> None:
        self.router.begin(node_id)

    def end(self, node_id: str) -> None:
        self.router.end(node_id)

    def in_flight(self, node_id: str) -> int:
        return self.router.in_flight(node_id)

    def timeout_s(self, node_id: str) -> float:
        return self.router.timeout_s(node_id)

    def observe_success(self, node_id: str, ttft_s: float | None, tpot_s: float | None) -> None:
        self.router.observe_success(node_id, ttft_s, tpot_s)

    def observe_failure(self, node_id: str) -> None:
        self.router.observe_failure(node_id)


_UNSET = object()


def load_selector(config_path: str | None = None, registry=_UNSET) -> NodeSelector:
    """The selector with the routing profile at `config_path` (None: deploy/profiles/default.yaml).

    Ban metrics go to the gateway's Prometheus registry (pass `registry=None` to skip, e.g. in tests
    that build several selectors in one process).
    """
    return NodeSelector(
        Router.from_yaml(config_path, registry=metrics.REGISTRY if registry is _UNSET else registry)
    )
