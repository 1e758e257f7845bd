"""An in-memory ledger and a stand-in reward split for the Settler (settlement.settler), shared by its
tests on the embedded chain and on anvil: two operators, one usage record per node per epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from settlement.keys import SettlerKey

OPS = [SettlerKey.generate().address for _ in range(2)]
EPOCH_S = 100.0


@dataclass
class Row:
    request_id: str
    node_id: str
    operator: str
    model: str = "default"
    prompt_tokens: int = 3
    completion_tokens: int = 5
    request_hash: str = ""
    response_hash: str = ""


@dataclass
class FakeLedger:
    """The promised UsageLedger surface, in memory, with one record per node per epoch."""

    closed: dict[int, list[Row]] = field(default_factory=dict)
    settled_tx: dict[int, bytes] = field(default_factory=dict)
    pending: dict[int, SimpleNamespace] = field(default_factory=dict)
    marks: list[int] = field(default_factory=list)

    def close_epoch(self, epoch):
        rows = [Row(f"req-{epoch}-{i}", f"node-{i}", op) for i, op in enumerate(OPS)]
        self.closed.setdefault(epoch, rows)
        return self.frozen_epoch(epoch)

    def frozen_epoch(self, epoch):
        return SimpleNamespace(epoch=epoch, rows=self.closed[epoch])

    def last_closed_epoch(self):
        return max(self.closed) if self.closed else None

    def usage_by_node(self, epoch):
        return {r.node_id: r for r in self.closed[epoch]}

    def mark_settled(self, epoch, tx_hash):
        self.marks.append(epoch)
        self.settled_tx[epoch] = tx_hash
        self.pending.pop(epoch, None)

    def settled(self, epoch):
        return self.settled_tx.get(epoch)

    def last_settled_epoch(self):
        return max(self.settled_tx) if self.settled_tx else None

    def put_pending_tx(self, epoch, raw_tx, nonce, tx_hash):
        self.pending[epoch] = SimpleNamespace(raw_tx=raw_tx, nonce=nonce, tx_hash=tx_hash)

    def pending_tx(self, epoch):
        return self.pending.get(epoch)

    def pending_since(self, epoch, tx_hash, block):
        p = self.pending.get(epoch)
        if p is None or p.tx_hash != tx_hash:
            return block
        p.since = getattr(p, "since", None) or block
        return p.since

    def clear_pending_tx(self, epoch):
        self.pending.pop(epoch, None)


def equal_split(usage, quality, emission_wei, prompt_weight, completion_weight):
    """Stand-in for settlement.rewards: split evenly between the operators of scored nodes."""
    ops = sorted({row.operator for node, row in usage.items() if quality.get(node, 0) > 0})
    per_op = {op: emission_wei // len(ops) for op in ops} if ops else {}
    if ops:
        per_op[ops[0]] += emission_wei - sum(per_op.values())
    return SimpleNamespace(per_node={}, per_operator=per_op, carried_wei=0 if ops else emission_wei)
