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
SETTLE_GAS = Counter(
    "meritnet_settlement_gas_used",
    "Gas used by this process's mined settle transactions (rate() gives gas per second).",
    registry=REGISTRY,
)
LAST_SETTLE_GAS = Gauge(
    "meritnet_settlement_last_settle_gas",
    "Gas used by the last mined settle transaction (0 before the first).",
    registry=REGISTRY,
)
LAST_COMMITTED_EPOCH = Gauge(
    "meritnet_settlement_last_committed_epoch",
    "The last epoch whose rewards and roots are computed and stored (may run ahead of the last settled "
    "one while an earlier epoch is stuck on-chain; -1 before the first).",
    registry=REGISTRY,
)
STUCK_STATES = ("scores", "chain_clock", "root_pending", "receipt", "fee_cap", "chain_unavailable", "error")
STUCK = Gauge(
    "meritnet_settlement_stuck",
    "1 for the state the oldest unsettled epoch waits in on the last pass, 0 for the others: scores "
    "(no consensus scores yet), chain_clock (the chain's clock has not reached the epoch's end), "
    "root_pending (the last reward root is still in its veto window), "
    "receipt (its tx is not mined yet), fee_cap (pending at the fee cap, no room to re-price), "
    "chain_unavailable, error (a reverted tx or another failed pass).",
    ["state"],
    registry=REGISTRY,
)
for _state in STUCK_STATES:
    STUCK.labels(_state).set(0)
