"""Prometheus metrics of the gateway process (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "meritnet_requests", "Requests finished by the gateway.", ["model", "node", "status"], registry=REGISTRY
)
TOKENS = Counter(
    "meritnet_tokens", "Tokens served (as reported to clients).", ["model", "node", "kind"], registry=REGISTRY
)
RETRIES = Counter(
    "meritnet_retries",
    "Node attempts that failed before the first byte and were retried.",
    ["model", "node"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "meritnet_client_errors", "Requests rejected with a 4xx/5xx error.", ["status", "code"], registry=REGISTRY
)
NO_NODE = Counter(
    "meritnet_no_eligible_node",
    "Routing decisions that found no node, by the filter that removed the last candidate "
    "(or 'excluded': every candidate already tried).",
    ["model", "stage"],
    registry=REGISTRY,
)
DEGRADED = Counter(
    "meritnet_degraded_decisions",
    "Requests served although a filter would have refused them (its fallback kept a node), by that filter: "
    "'quality-floor' means every candidate of the model was scored below the floor.",
    ["model", "stage"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("meritnet_in_flight", "Requests in flight per node.", ["node"], registry=REGISTRY)
LIVE_NODES = Gauge(
    "meritnet_live_nodes", "Live nodes per model in the gateway's snapshot.", ["model"], registry=REGISTRY
)
# Buckets in seconds: a tiny CPU model answers in ms, a large GPU model in seconds.
_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TTFT = Histogram(
    "meritnet_ttft_seconds",
    "Time to first byte sent to the client.",
    ["model", "node"],
    buckets=_LAT,
    registry=REGISTRY,
)
E2E = Histogram(
    "meritnet_request_seconds",
    "Time from receipt to the last byte.",
    ["model", "node"],
    buckets=_LAT,
    registry=REGISTRY,
)
ITL = Histogram(
    "meritnet_inter_token_seconds",
    "Gap between successive stream messages sent to a client (each carries one or more tokens).",
    ["model", "node"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5),
    registry=REGISTRY,
)
SHADOW_OFFERED = Counter(
    "meritnet_shadow_offered",
    "Organic completions offered to validators for shadow verification.",
    ["model", "node"],
    registry=REGISTRY,
)
USAGE_DISAGREEMENTS = Counter(
    "meritnet_usage_disagreements",
    "Requests where a node's self-reported usage differs from the gateway's count (field: prompt or "
    "completion), or where the gateway could not count a prompt itself (field: unmetered_prompt).",
    ["node", "field"],
    registry=REGISTRY,
)
MALFORMED = Counter(
    "meritnet_node_malformed_output",
    "Node answers the gateway could not parse (the node is penalised; the client gets a retry or an error).",
    ["node"],
    registry=REGISTRY,
)
KEY_REQUESTS = Counter(
    "meritnet_key_requests",
    "Requests per client key id (never the key) by outcome: ok, error, cancelled, rate_limited, over_budget.",
    ["key", "status"],
    registry=REGISTRY,
)
KEY_TOKENS = Counter(
    "meritnet_key_tokens", "Tokens billed per client key id (gateway counts).", ["key"], registry=REGISTRY
)
KEY_BUDGET_USED = Gauge(
    "meritnet_key_budget_used_tokens",
    "A budgeted key's tokens in its current window: billed (the usage ledger) plus held by running requests.",
    ["key"],
    registry=REGISTRY,
)
