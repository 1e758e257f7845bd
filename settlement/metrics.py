"""Prometheus metrics of the settler: one for every state in which epochs wait instead of settling.

Kept in this module's own REGISTRY (like scoring.metrics) in the process that runs the settler;
SettlementService.metrics_text() returns them in Prometheus' text format. Each stuck state also has
a log line at the place it is detected (actor.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()

LAST_SETTLED_EPOCH = Gauge(
    "meritnet_settlement_last_settled_epoch",
    "The last epoch settled on-chain (-1 before the first).",
    registry=REGISTRY,
)
EPOCHS_WAITING = Gauge(
    "meritnet_settlement_epochs_waiting",
    "Closed epochs not settled yet (waiting for scores, the chain's clock, a receipt or the chain).",
    registry=REGISTRY,
)
PENDING_TX_AGE_BLOCKS = Gauge(
    "meritnet_settlement_pending_tx_age_blocks",
    "Blocks the oldest epoch's settle tx has been pending, as seen by this process (0: none).",
    registry=REGISTRY,
)
CHAIN_ERRORS = Counter(
    "meritnet_settlement_chain_errors",
    "Settlement passes that failed on the chain, by kind (unavailable, reverted, error).",
    ["kind"],
    registry=REGISTRY,
)
