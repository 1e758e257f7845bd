"""The Settler pays validators by dividend, computes later epochs while an earlier one is stuck, and
takes nothing from consensus that could stop it (embedded chain, in-memory ledger)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from settlement.chain import Chain
from settlement.chain_settings import ChainSettings
from settlement.config import SettlementConfig
from settlement.keys import SettlerKey
from settlement.metrics import REGISTRY
from settlement.rewardbook import RewardBook
from settlement.settler import Settler
from tests.support.clock import Clock
from tests.support.settler_fakes import EPOCH_S, OPS, FakeLedger, equal_split

VALIDATORS = [SettlerKey.generate().address for _ in range(3)]
# The hand-worked round-2 dividends of tests/unit/test_consensus_dividends.py (A, B, C).
DIVIDENDS = {VALIDATORS[0]: 49 / 120, VALIDATORS[1]: 22 / 120, VALIDATORS[2]: 49 / 120}


def _world(tmp_path, **config):
    chain = Chain.embedded(ChainSettings(receipt_timeout_s=0.5, poll_interval_s=0.05))
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    w = SimpleNamespace(
        chain=chain,
        key=key,
        ledger=FakeLedger(),
        book=RewardBook(tmp_path / "book.sqlite"),
        clock=Clock(1.5 * EPOCH_S),
        config=SettlementConfig(epoch_length_s=EPOCH_S, claim_delay_s=0, **({"emission_wei": 6000} | config)),
    )
    w.settler = Settler(w.ledger, w.chain, w.key, w.book, w.config, clock=w.clock, rewards=equal_split)
    w.settler.ensure_contract()
    return w


def stuck(state: str) -> float:
    return REGISTRY.get_sample_value("meritnet_settlement_stuck", {"state": state})


def test_validators_are_paid_their_share_by_dividend_and_the_epoch_sums_to_the_emission(tmp_path):
    w = _world(tmp_path)  # validator_share_bps 2,000 by default: 1,200 of 6,000 wei
    assert w.settler.submit_quality(0, {"node-0": 1.0, "node-1": 1.0}, DIVIDENDS)
    assert w.settler.tick() == [0]
    c = w.book.get(0)
    assert c.validator_rewards == dict(zip(VALIDATORS, (490, 220, 490)))
    assert c.operator_rewards == {OPS[0]: 2400, OPS[1]: 2400}
    assert c.epoch_reward == 6000 == sum(c.cumulative.values()) and c.carried_wei == 0
    assert w.chain.total_rewarded() == 6000
    assert w.ledger.settled(0)


def test_an_epoch_without_dividends_pays_operators_all_and_junk_from_consensus_is_dropped(tmp_path):
    w = _world(tmp_path)
    junk = {"not-an-address": 0.5, VALIDATORS[0]: float("nan"), VALIDATORS[1]: -1.0, VALIDATORS[2]: True}
    assert w.settler.submit_quality(0, {"node-0": 1.0, "node-1": float("inf")}, junk)
    assert w.book.dividends(0) == {} and w.book.quality(0) == {"node-0": 1.0}
    assert w.settler.tick() == [0]
    c = w.book.get(0)
    assert c.validator_rewards == {} and sum(c.operator_rewards.values()) == 6000


def test_a_validator_that_is_also_an_operator_has_one_leaf(tmp_path):
    w = _world(tmp_path)
    assert w.settler.submit_quality(0, {"node-0": 1.0, "node-1": 1.0}, {OPS[0].lower(): 1.0})
    assert w.settler.tick() == [0]
    c = w.book.get(0)
    assert c.cumulative == {OPS[0]: 2400 + 1200, OPS[1]: 2400}


def test_later_epochs_are_committed_while_an_earlier_one_waits_on_the_chain(tmp_path):
    w = _world(tmp_path)
    w.clock.t = 4.5 * EPOCH_S  # epochs 0..3 have ended
    real_sign = w.chain.sign_settle
    w.chain.sign_settle = lambda *a: (_ for _ in ()).throw(RuntimeError("the signer is down"))
    with pytest.raises(RuntimeError, match="signer"):
        w.settler.tick()
    assert stuck("error") == 1
    # Nothing settled, but every closed epoch's rewards are computed and stored, in order.
    assert w.ledger.last_settled_epoch() is None
    assert [w.book.get(e).epoch for e in range(4)] == [0, 1, 2, 3]
    assert w.book.latest().cumulative == {OPS[0]: 12000, OPS[1]: 12000}
    assert REGISTRY.get_sample_value("meritnet_settlement_last_committed_epoch") == 3
    w.chain.sign_settle = real_sign
    assert w.settler.tick() == [0, 1, 2, 3]  # the stored epochs go out as soon as the first can
    assert stuck("error") == 0
    assert w.chain.total_rewarded() == 4 * 6000


def test_an_epoch_waiting_for_scores_is_committed_after_the_configured_wait(tmp_path):
    w = _world(tmp_path, default_quality=None, max_score_wait_epochs=2)
    assert w.settler.tick() == []  # epoch 0 has no scores yet
    assert stuck("scores") == 1 and w.book.get(0) is None
    w.clock.t = 2.5 * EPOCH_S
    assert w.settler.submit_quality(1, {"node-0": 1.0}, {})
    assert w.settler.tick() == []  # one later epoch closed: still waiting (and it holds epoch 1)
    assert w.book.get(1) is None
    w.clock.t = 3.5 * EPOCH_S
    assert w.settler.tick() == [0, 1]  # two later epochs closed: 0 goes without scores
    assert stuck("scores") == 1  # now epoch 2 waits for its scores
    c0, c1 = w.book.get(0), w.book.get(1)
    assert c0.epoch_reward == 0 and c0.carried_wei == 6000  # unscored nodes weigh 0: carried on
    assert c1.operator_rewards == {OPS[0]: 12000}
