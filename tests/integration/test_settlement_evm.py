"""End to end on the embedded chain (py-evm via eth-tester): ledger -> settler -> chain -> claims and proofs."""

from __future__ import annotations

import time

import pytest

from cluster import UsageRecord
from settlement.actor import SettlementService
from settlement.chain import ContractReverted
from settlement.cli import onchain_root
from settlement.config import SettlementConfig
from settlement.keys import SettlerKey
from settlement.merkle import MerkleTreeError, StandardMerkleTree
from settlement.trees import find_reward_leaf, find_usage_leaf, reward_tree, usage_tree

pytestmark = pytest.mark.integration

EPOCH_S = 100.0


def test_service_settles_epochs_and_operators_claim(tmp_path, monkeypatch):
    key = SettlerKey.generate()
    monkeypatch.setenv("MERITNET_SETTLER_KEY", key.export_hex())
    operators = [SettlerKey.generate().address for _ in range(3)]
    genesis = time.time() - 4.5 * EPOCH_S
    config = SettlementConfig(
        ledger_path=tmp_path / "ledger.sqlite",
        epoch_length_s=EPOCH_S,
        genesis=genesis,
        emission_wei=10**18,
        claim_delay_s=0,  # four epochs settle in one pass and claim at once (veto window: test_settlement_chain)
    )
    # Epoch 2 is scored 0 for everyone: its emission carries into epoch 3.
    quality = {2: {f"node-{i}": 0.0 for i in range(3)}, 0: {"node-0": 0.5, "node-1": 1.0, "node-2": 0.25}}
    service = SettlementService(config, quality=quality)
    records = [
        UsageRecord(
            request_id=f"r{epoch}-{i}",
            node_id=f"node-{i % 3}",
            operator=operators[i % 3],
            model="m",
            prompt_tokens=5 * i,
            completion_tokens=7,
            started_at=genesis,
            ended_at=genesis + epoch * EPOCH_S + i,
            status="ok" if i != 4 else "error",
        )
        for epoch in range(4)
        for i in range(6)
    ]
    service.ledger.append(records)
    assert service.tick() == [0, 1, 2, 3]
    chain = service.chain
    assert [e["epoch"] for e in chain.settled_events()] == [0, 1, 2, 3]
    assert chain.total_rewarded() == 4 * 10**18
    assert service.book.get(2).epoch_reward == 0 and service.book.get(3).epoch_reward == 2 * 10**18

    # Every interaction of every epoch proves against the on-chain usage root.
    for epoch in range(4):
        tree = usage_tree(service.ledger.frozen_epoch(epoch))
        root = "0x" + onchain_root(chain, "usage", epoch).hex()
        i = find_usage_leaf(tree, f"r{epoch}-5")
        assert StandardMerkleTree.verify(root, tree.leaf_encoding, tree.at(i), tree.get_proof(i))
        with pytest.raises(MerkleTreeError):
            find_usage_leaf(tree, f"r{epoch}-4")  # an error record earns no leaf

    cumulative = service.book.get(3).cumulative
    tree = reward_tree(cumulative)
    assert "0x" + onchain_root(chain, "rewards", 3).hex() == tree.root
    for op in operators:
        proof = [bytes.fromhex(p[2:]) for p in tree.get_proof(find_reward_leaf(tree, op))]
        chain.claim(key, op, cumulative[op], proof)
        assert chain.balance_of(op) == cumulative[op]
        with pytest.raises(ContractReverted, match="NothingToClaim"):
            chain.claim(key, op, cumulative[op], proof)
    assert chain.total_supply() == sum(cumulative.values()) == 4 * 10**18
    assert service.status()["last_committed_epoch"] == 3
    # the status page's view: newest first, each with its transaction and the ledger's rewards
    recent = service.recent_epochs(2)
    assert [e["epoch"] for e in recent] == [3, 2]
    assert recent[0]["tx"] == service.ledger.settled(3)
    assert {op: int(w) for op, w in recent[0]["rewards"].items()} == service.ledger.rewards(3)[0]
