"""What the usage ledger hands out: the outcome of an append, an epoch frozen with its ok rows, a
written-ahead settle tx, the ledger's one error, and the tokens-per-node grouping that a frozen epoch
and the ledger's own query share (settlement.ledger)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from settlement.rewards import NodeUsage
from settlement.trees import USAGE_LEAF_VERSION

__all__ = ["AppendResult", "FrozenEpoch", "LedgerError", "PendingTx", "UsageRow", "group_by_node"]


class LedgerError(RuntimeError):
    """A ledger operation that cannot proceed; the message says what to do instead."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of one `append`: all of it is durable when the call returns."""

    accepted: int
    duplicates: tuple[str, ...]
    late: int  # accepted records whose natural epoch was closed; assigned to the next open epoch
    rejected: tuple[str, ...] = ()  # request ids with counts outside UsageRecord's bounds: not stored


class UsageRow(NamedTuple):
    """The part of an ok record that rewards and the usage tree need."""

    request_id: str
    node_id: str
    operator: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    request_hash: str = ""  # sha256 hex of the body the client sent ('' for records before they had one)
    response_hash: str = ""  # sha256 hex of the body the client got


class PendingTx(NamedTuple):
    """A signed settlement transaction written ahead of its broadcast."""

    raw_tx: bytes
    nonce: int
    tx_hash: str


@dataclass(frozen=True, slots=True)
class FrozenEpoch:
    """A closed epoch: its ok records in request_id order, and a digest of all its records."""

    epoch: int
    start: float  # [start, end) in unix seconds: the natural range; late records may be older
    end: float
    closed_at: float
    n_records: int  # all statuses
    digest: str  # sha256 hex over every record of the epoch in request_id order (see settlement.ledger)
    rows: tuple[UsageRow, ...]  # status "ok" only
    leaf_version: int = USAGE_LEAF_VERSION  # the usage leaf layout its tree is built with (settlement.trees)

    def usage_by_node(self) -> dict[str, tuple[NodeUsage, ...]]:
        """Tokens per node and operator over the ok rows (same answer as UsageLedger.usage_by_node)."""
        return group_by_node((r.node_id, r.operator, r.prompt_tokens, r.completion_tokens) for r in self.rows)


def group_by_node(
    rows: Iterator[tuple[str, str, int, int]] | Sequence[tuple[str, str, int, int]],
) -> dict[str, tuple[NodeUsage, ...]]:
    """Tokens per node id, one NodeUsage per operator it served under (sorted by operator): a node id
    can change operator within an epoch (unregister + register), and each operator is paid for its own
    part (settlement.rewards)."""
    tokens: dict[tuple[str, str], tuple[int, int]] = {}
    for node_id, operator, prompt, completion in rows:
        p, c = tokens.get((node_id, operator), (0, 0))
        tokens[(node_id, operator)] = (p + prompt, c + completion)
    out: dict[str, tuple[NodeUsage, ...]] = {}
    for (node_id, operator), (prompt, completion) in sorted(tokens.items()):
        out[node_id] = (*out.get(node_id, ()), NodeUsage(operator, prompt, completion))
    return out
