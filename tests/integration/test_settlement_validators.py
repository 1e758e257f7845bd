"""Rewards end to end with validators, on the embedded chain (py-evm): consensus rounds (scoring's
ConsensusService, no Ray) -> per-epoch quality and dividends -> settler -> chain; operators and
validators both claim their shares with the same contract call, and the shares sum to the emission."""

from __future__ import annotations

import time

import pytest

from cluster import UsageRecord
from cluster.records import NodeScore
from scoring.consensus_service import ConsensusService
from settlement.actor import SettlementService
from settlement.chain import ContractReverted
from settlement.config import SettlementConfig
from settlement.keys import SettlerKey
from settlement.trees import find_reward_leaf, reward_tree

pytestmark = pytest.mark.integration

EPOCH_S = 100.0
EMISSION = 10**18 + 7  # odd on purpose: the split must still be exact


def _scores(validator: str, weights: dict[str, float], at: float) -> list[NodeScore]:
    return [
        NodeScore(validator=validator, node_id=n, integrity=1.0, availability=1.0, speed=w, score=w, at=at)
        for n, w in weights.items()
    ]


def test_operators_and_validators_are_paid_in_a_settled_epoch_and_claim(tmp_path, monkeypatch):
    settler_key = SettlerKey.generate()
    monkeypatch.setenv("MERITNET_SETTLER_KEY", settler_key.export_hex())
    operators = [SettlerKey.generate().address for _ in range(2)]
    validators = {v: SettlerKey.generate().address for v in ("A", "B", "C")}
    genesis = float(int(time.time() - 1.5 * EPOCH_S))
    config = SettlementConfig(
        ledger_path=tmp_path / "ledger.sqlite",
        epoch_length_s=EPOCH_S,
        genesis=genesis,
        emission_wei=EMISSION,
        default_quality=0.0,  # with validators: unscored nodes are on probation
        validator_share_bps=4100,  # Bittensor's 41% to validators, to show the knob
        claim_delay_s=0,  # claimed right after its settle (the veto window: test_settlement_chain)
    )
    service = SettlementService(config)
    service.ledger.append(
        [
            UsageRecord(
                request_id=f"r{i}",
                node_id=f"node-{i % 2}",
                operator=operators[i % 2],
                model="m",
                prompt_tokens=10 + i,
                completion_tokens=20,
                started_at=genesis,
                ended_at=genesis + 5 + i,
                status="ok",
            )
            for i in range(6)
        ]
    )

    # Two consensus rounds in epoch 0: B first scores only node-1, then copies A and C.
    consensus = ConsensusService(dict.fromkeys(validators, 1.0), validators, 1.0, EPOCH_S, genesis)
    both = {"node-0": 1.0, "node-1": 1.0}
    for t, b_weights in ((genesis + 10, {"node-1": 1.0}), (genesis + 20, both)):
        scores = {v: _scores(v, both if v != "B" else b_weights, t) for v in validators}
        _quality, epoch, mean = consensus.round(scores, now=t)
        assert epoch == 0
        service.submit_quality(epoch, mean, consensus.epochs.mean_dividends(epoch))
    dividends = consensus.epochs.mean_dividends(0)
    assert dividends[validators["A"]] > dividends[validators["B"]]  # early beats late copying

    assert service.tick() == [0]
    chain = service.chain
    c = service.book.get(0)
    to_validators = EMISSION * 4100 // 10_000
    assert sum(c.validator_rewards.values()) == to_validators
    assert sum(c.operator_rewards.values()) == EMISSION - to_validators
    assert set(c.validator_rewards) == set(validators.values())
    # equal dividends: equal wei, but for the one the largest-remainder rule may hand either of them
    assert abs(c.validator_rewards[validators["A"]] - c.validator_rewards[validators["C"]]) <= 1
    assert c.validator_rewards[validators["A"]] > c.validator_rewards[validators["B"]] > 0
    assert set(c.operator_rewards) == set(operators) and all(c.operator_rewards.values())
    assert c.epoch_reward == EMISSION == chain.total_rewarded() and c.carried_wei == 0

    # Everyone claims with the same call and proof shape; the minted total is the emission.
    tree = reward_tree(c.cumulative)
    for account in [*operators, *validators.values()]:
        proof = [bytes.fromhex(p[2:]) for p in tree.get_proof(find_reward_leaf(tree, account))]
        chain.claim(settler_key, account, c.cumulative[account], proof)
        assert chain.balance_of(account) == c.cumulative[account]
        with pytest.raises(ContractReverted, match="NothingToClaim"):
            chain.claim(settler_key, account, c.cumulative[account], proof)
    assert chain.total_supply() == EMISSION
