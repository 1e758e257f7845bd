"""Prometheus gauges of scoring: per node (integrity, availability, speed, consensus quality) and per
validator (trust). They live in the default registry of the process that scores (a validator actor,
or the consensus driver); `deploy/` exposes them with prometheus_client's HTTP server or /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from cluster.records import NodeScore, QualityScores

REGISTRY = CollectorRegistry(auto_describe=True)

NODE_INTEGRITY = Gauge(
    "meritnet_node_integrity",
    "Verification pass rate (0 after fraud), per validator.",
    ["node", "validator"],
    registry=REGISTRY,
)
NODE_AVAILABILITY = Gauge(
    "meritnet_node_availability",
    "Challenge success rate, per validator.",
    ["node", "validator"],
    registry=REGISTRY,
)
NODE_SPEED = Gauge(
    "meritnet_node_speed",
    "Speed vs the model's fleet median, per validator.",
    ["node", "validator"],
    registry=REGISTRY,
)
NODE_QUALITY = Gauge(
    "meritnet_node_consensus_quality",
    "Consensus quality in [0,1] used by router and settlement.",
    ["node"],
    registry=REGISTRY,
)
VALIDATOR_TRUST = Gauge(
    "meritnet_validator_trust",
    "Yuma validator trust (share of weight within consensus).",
    ["validator"],
    registry=REGISTRY,
)
VALIDATOR_STAKE = Gauge(
    "meritnet_validator_stake",
    "Stake consensus weighs a validator by (the network config's, or the distributor's record).",
    ["validator"],
    registry=REGISTRY,
)
VERIFY_ERRORS = Counter(
    "meritnet_validator_verify_errors",
    "Verifications that failed on the validator's side (reference engine), per validator: no verdict.",
    ["validator"],
    registry=REGISTRY,
)
REPORTS_REFUSED = Counter(
    "meritnet_score_reports_refused",
    "Score reports consensus refused (malformed, wrong_validator, bad_signature, stale), per validator.",
    ["validator", "reason"],
    registry=REGISTRY,
)
LOOP_RESTARTS = Counter(
    "meritnet_validator_loop_restarts",
    "Validator loops (challenge, shadow feed) restarted after an unexpected error.",
    ["validator", "loop"],
    registry=REGISTRY,
)


def observe_node_score(s: NodeScore) -> None:
    NODE_INTEGRITY.labels(s.node_id, s.validator).set(s.integrity)
    if s.availability is not None:
        NODE_AVAILABILITY.labels(s.node_id, s.validator).set(s.availability)
    if s.speed is not None:
        NODE_SPEED.labels(s.node_id, s.validator).set(s.speed)


def observe_quality(q: QualityScores) -> None:
    for node, value in q.quality.items():
        NODE_QUALITY.labels(node).set(value)


def observe_validator_trust(trust: dict[str, float]) -> None:
    for validator, value in trust.items():
        VALIDATOR_TRUST.labels(validator).set(value)
