"""The Settler's decisions on the embedded chain with an in-memory ledger: order, exactly-once, restarts.

Each "crash" here is a fresh Settler over the same ledger, book and chain, entered in the state a
SIGKILL at that step leaves behind (the real SIGKILL runs are in tests/integration/test_settlement_faults.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from web3 import Web3

from settlement.chain import Chain, ChainUnavailable, ContractReverted
from settlement.chain_settings import ChainSettings
from settlement.config import EMISSION_CAP_HEADROOM, SettlementConfig
from settlement.fees import fees_of_raw
from settlement.keys import SettlerKey, SettlerKeyError
from settlement.rewardbook import RewardBook
from settlement.settle_tx import SettlementConflict
from settlement.settler import Settler
from tests.support.clock import Clock
from tests.support.settlement_chain import next_block_at
from tests.support.settler_fakes import EPOCH_S, OPS, FakeLedger, equal_split


@pytest.fixture
def world(tmp_path):
    chain = Chain.embedded(ChainSettings(receipt_timeout_s=0.5, poll_interval_s=0.05))
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    w = SimpleNamespace(
        chain=chain,
        key=key,
        ledger=FakeLedger(),
        book=RewardBook(tmp_path / "book.sqlite"),
        clock=Clock(3.5 * EPOCH_S),
        config=SettlementConfig(epoch_length_s=EPOCH_S, emission_wei=1000, claim_delay_s=0),  # no veto window
    )
    w.settler = lambda: Settler(
        w.ledger, w.chain, w.key, w.book, w.config, quality=None, clock=w.clock, rewards=equal_split
    )
    return w


def onchain_epochs(chain: Chain) -> list[int]:
    return [e["epoch"] for e in chain.settled_events()]


def test_closes_due_epochs_and_settles_each_once_in_order(world):
    settler = world.settler()
    settler.ensure_contract()
    assert settler.tick() == [0, 1, 2]  # t = 3.5 epochs: epochs 0..2 have ended, 3 has not
    assert settler.tick() == []
    world.clock.t = 5.0 * EPOCH_S
    assert settler.tick() == [3, 4]
    assert onchain_epochs(world.chain) == [0, 1, 2, 3, 4] and world.ledger.marks == [0, 1, 2, 3, 4]
    assert world.chain.total_rewarded() == 5 * 1000
    # The book's cumulative amounts are what the chain pays out.
    from settlement.trees import find_reward_leaf, reward_tree

    latest = world.book.latest()
    assert sum(latest.cumulative.values()) == 5000
    tree = reward_tree(latest.cumulative)
    assert world.chain.reward_root() == bytes.fromhex(tree.root[2:])
    proof = [bytes.fromhex(p[2:]) for p in tree.get_proof(find_reward_leaf(tree, OPS[1]))]
    world.chain.claim(world.key, OPS[1], latest.cumulative[OPS[1]], proof)
    assert world.chain.balance_of(OPS[1]) == latest.cumulative[OPS[1]]


def test_deploys_with_the_settler_as_admin_and_twice_the_emission_as_cap_by_default(world):
    world.settler().ensure_contract()
    assert world.chain.admin() == world.chain.settler() == world.key.address
    assert world.chain.emission_cap() == EMISSION_CAP_HEADROOM * world.config.emission_wei == 2000


def test_a_deployed_distributor_records_the_configured_validator_stakes(world, caplog):
    v1, v2 = (SettlerKey.generate().address for _ in range(2))
    world.config = world.config.model_copy(update={"validator_stakes": {v1: 2.0, v2: 0.5}})
    settler = world.settler()
    settler.ensure_contract()
    assert settler.validator_stakes([v1, v2, OPS[0]]) == {v1: 2 * 10**18, v2: 5 * 10**17, OPS[0]: 0}
    # With another admin (a multisig) the settler cannot write them: it says who must.
    other = SettlerKey.generate()
    world.chain.fund(other.address, 10**20)
    world.chain.deploy(world.key, 0, 2000, other.address, genesis=0, epoch_length=int(EPOCH_S))
    settler._record_stakes()
    assert "meritnet settlement set-stake" in caplog.text
    assert settler.validator_stakes([v1]) == {v1: 0}


def test_an_emission_cap_below_the_emission_is_refused():
    with pytest.raises(ValueError, match="below emission_wei"):
        SettlementConfig(emission_wei=1000, emission_cap_wei=999)


def test_carry_above_the_cap_is_paid_over_later_epochs(world):
    """Epochs 0 and 1 are scored 0 (their emission carries); later epochs pay at most the cap and
    carry the rest on until the carry is drained. Every epoch settles, and each one's paid plus
    carried wei equals its emission plus the wei carried into it."""
    world.config = SettlementConfig(
        epoch_length_s=EPOCH_S, emission_wei=1000, emission_cap_wei=1500, claim_delay_s=0
    )
    world.clock.t = 6.5 * EPOCH_S
    unscored = {f"node-{i}": 0.0 for i in range(len(OPS))}
    settler = Settler(
        world.ledger,
        world.chain,
        world.key,
        world.book,
        world.config,
        quality={0: unscored, 1: unscored},
        clock=world.clock,
        rewards=equal_split,
    )
    settler.ensure_contract()
    assert settler.tick() == [0, 1, 2, 3, 4, 5]
    paid = [world.book.get(e).epoch_reward for e in range(6)]
    carried = [world.book.get(e).carried_wei for e in range(6)]
    assert paid == [0, 0, 1500, 1500, 1500, 1500] and carried == [1000, 2000, 1500, 1000, 500, 0]
    assert world.chain.total_rewarded() == 6 * 1000


def test_a_bound_contract_with_a_cap_below_the_emission_pays_the_cap_and_says_so(world, caplog):
    genesis, length = world.config.epochs.onchain()
    # Deployed elsewhere, with a smaller cap than configured.
    world.chain.deploy(world.key, 0, 600, genesis=genesis, epoch_length=length)
    settler = world.settler()
    with caplog.at_level("ERROR", logger="settlement.settler"):
        assert settler.tick() == [0, 1, 2]
    assert [world.book.get(e).carried_wei for e in range(3)] == [400, 800, 1200]
    assert world.chain.total_rewarded() == 3 * 600
    assert sum("below the configured emission" in r.message for r in caplog.records) == 1  # said once


def test_a_paused_contract_holds_epochs_until_the_admin_unpauses(world):
    admin = SettlerKey.generate()
    world.chain.fund(admin.address, 10**20)
    world.chain.settings.admin = admin.address
    settler = world.settler()
    settler.ensure_contract()
    assert world.chain.admin() == admin.address != world.key.address
    world.chain.transact(admin, "pause")
    with pytest.raises(ContractReverted) as info:
        settler.tick()
    assert info.value.error == "EnforcedPause"
    assert world.ledger.pending == {} and world.ledger.marks == []  # refused before anything was signed
    world.chain.transact(admin, "unpause")
    assert settler.tick() == [0, 1, 2] and onchain_epochs(world.chain) == [0, 1, 2]


def test_deploys_with_the_ledgers_epochs_and_a_closed_epoch_settles_once_the_chain_reaches_its_end(world):
    """The settler's clock runs ahead of the chain's: the ledger closes epoch 0, the contract refuses
    it (EpochNotEnded) and the settler waits, signing nothing; once the chain's clock reaches the
    contract's end of the epoch it settles. Genesis is fractional: the contract gets it floored."""
    genesis = world.chain.timestamp() + 1000 + 0.75
    world.config = SettlementConfig(
        epoch_length_s=EPOCH_S, emission_wei=1000, genesis=genesis, claim_delay_s=0
    )
    world.clock.t = genesis + 1.5 * EPOCH_S
    settler = world.settler()
    settler.ensure_contract()
    assert world.chain.epochs() == (int(genesis), int(EPOCH_S))
    assert settler.tick() == [] and world.ledger.last_closed_epoch() == 0
    assert world.ledger.pending == {} and world.chain.next_epoch() == 0  # nothing signed or sent
    # A block at the contract's end of epoch 0 (0.75 s before the ledger's): the settle goes through.
    next_block_at(world.chain, int(genesis) + int(EPOCH_S))
    world.chain.fund(world.key.address, 1)  # mines it
    assert world.chain.timestamp() == int(genesis) + int(EPOCH_S)
    assert settler.tick() == [0] and onchain_epochs(world.chain) == [0]


def test_a_bound_contract_timing_other_epochs_is_refused(world):
    world.chain.deploy(world.key, 0, 2000, genesis=0, epoch_length=60)  # the ledger's epochs are 100 s
    with pytest.raises(SettlementConflict, match="times epochs"):
        world.settler().ensure_contract()


@pytest.mark.parametrize("length", [0.5, 90.5])
def test_an_epoch_length_in_fractions_of_a_second_is_refused(length):
    with pytest.raises(ValueError, match="whole number of seconds"):
        SettlementConfig(epoch_length_s=length)


def test_written_ahead_but_never_sent_is_resigned_at_the_same_nonce_with_bumped_fees(world, monkeypatch):
    first = world.settler()
    first.ensure_contract()
    monkeypatch.setattr(world.chain, "send_raw", lambda raw: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        first.tick()  # dies between the write-ahead and the broadcast of epoch 0
    monkeypatch.undo()
    stale = world.ledger.pending_tx(0)
    nonce, fees = fees_of_raw(stale.raw_tx)
    assert (
        world.chain.tx_info(bytes.fromhex(stale.tx_hash[2:])).state == "unknown"
    )  # the node never saw it: dropped

    assert world.settler().tick() == [0, 1, 2]
    sent = world.chain.w3.eth.get_transaction(world.ledger.settled_tx[0])
    assert sent["nonce"] == nonce and sent["maxFeePerGas"] > fees.max_fee
    assert onchain_epochs(world.chain) == [0, 1, 2]


def test_pending_tx_is_rebroadcast_byte_for_byte(world):
    settler = world.settler()
    settler.ensure_contract()
    tester = world.chain.w3.provider.ethereum_tester
    tester.disable_auto_mine_transactions()
    assert settler.tick() == []  # sent, no receipt within the timeout: stays pending
    pending = world.ledger.pending_tx(0)
    assert world.chain.tx_info(bytes.fromhex(pending.tx_hash[2:])).state == "pending"

    restarted = world.settler()
    tester.enable_auto_mine_transactions()  # mines what is pending
    assert restarted.tick() == [0, 1, 2]
    assert world.ledger.settled_tx[0] == pending.tx_hash
    assert onchain_epochs(world.chain) == [0, 1, 2]


def test_settled_on_chain_but_not_recorded_is_adopted_without_a_new_tx(world, monkeypatch):
    settler = world.settler()
    settler.ensure_contract()
    monkeypatch.setattr(
        world.ledger, "mark_settled", lambda e, h: (_ for _ in ()).throw(SystemExit("killed"))
    )
    with pytest.raises(SystemExit):
        settler.tick()  # epoch 0 is on-chain, the process dies before recording it
    monkeypatch.undo()
    nonce = world.chain.nonce(world.key.address)
    assert world.settler().settle_closed() == [0, 1, 2]
    assert world.ledger.marks == [0, 1, 2] and onchain_epochs(world.chain) == [0, 1, 2]
    assert world.chain.nonce(world.key.address) == nonce + 2  # only epochs 1 and 2 needed a tx


def test_chain_outage_queues_epochs_and_settles_them_in_order_later(world, monkeypatch):
    settler = world.settler()
    settler.ensure_contract()

    def down(*a, **k):
        raise ChainUnavailable("down")

    monkeypatch.setattr(world.chain, "next_epoch", down)
    with pytest.raises(ChainUnavailable):
        settler.tick()
    world.clock.t = 6.0 * EPOCH_S
    with pytest.raises(ChainUnavailable):
        settler.tick()
    assert world.ledger.last_closed_epoch() == 5 and world.ledger.marks == []
    monkeypatch.undo()
    assert settler.tick() == [0, 1, 2, 3, 4, 5]
    assert onchain_epochs(world.chain) == [0, 1, 2, 3, 4, 5]


def test_foreign_roots_on_chain_stop_the_settler(world):
    settler = world.settler()
    settler.ensure_contract()
    raw = world.chain.sign_settle(
        world.key,
        0,
        Web3.keccak(text="other"),
        b"\x01" * 32,
        1,
        1,
        world.chain.nonce(world.key.address),
        world.chain.fees(),
    )
    world.chain.wait_receipt(world.chain.send_raw(raw))
    with pytest.raises(SettlementConflict, match="epoch 0 is on-chain"):
        settler.tick()
    assert world.ledger.marks == []


def test_the_key_never_shows(monkeypatch, tmp_path):
    key = SettlerKey.generate()
    secret = key.export_hex()
    assert secret.removeprefix("0x") not in repr(key) + str(key) and key.address in repr(key)
    monkeypatch.setenv("MERITNET_SETTLER_KEY", secret)
    assert SettlerKey.load().address == key.address
    monkeypatch.setenv("MERITNET_SETTLER_KEY", secret[:-3] + "zzz")
    with pytest.raises(SettlerKeyError) as info:
        SettlerKey.load()
    assert secret[4:-3] not in str(info.value) and info.value.__cause__ is None
    monkeypatch.delenv("MERITNET_SETTLER_KEY")
    key_file = tmp_path / "settler.key"
    key_file.write_text(secret + "\n")
    key_file.chmod(0o644)
    monkeypatch.setenv("MERITNET_SETTLER_KEY_FILE", str(key_file))
    with pytest.raises(SettlerKeyError, match="chmod 600") as info:  # readable by others: refused
        SettlerKey.load()
    assert secret[4:-3] not in str(info.value)
    key_file.chmod(0o600)
    assert SettlerKey.load().address == key.address
    with pytest.raises(TypeError):
        __import__("pickle").dumps(key)


def test_a_crash_while_committing_then_late_quality_settles_once_with_the_late_quality(world):
    # The commitment is one write to its one owner (the RewardBook): a crash before it stores
    # nothing, so nothing was promised and the later scores are the epoch's scores.
    world.clock.t = 1.5 * EPOCH_S
    settler = world.settler()
    settler.ensure_contract()
    assert settler.submit_quality(0, {"node-0": 1.0, "node-1": 1.0})

    def crash(commitment):
        raise KeyboardInterrupt("killed while writing the commitment")

    settler.book = SimpleNamespace(
        get=world.book.get,
        latest=world.book.latest,
        quality=world.book.quality,
        put_quality=world.book.put_quality,
        dividends=world.book.dividends,
        put=crash,
    )
    with pytest.raises(KeyboardInterrupt):
        settler.tick()
    assert world.book.get(0) is None

    restarted = world.settler()
    late = {"node-0": 1.0, "node-1": 0.0}
    assert restarted.submit_quality(0, late)  # not committed yet: taken
    assert restarted.tick() == [0] and restarted.tick() == []
    assert not restarted.submit_quality(0, {"node-0": 0.0, "node-1": 1.0})  # committed: frozen
    assert onchain_epochs(world.chain) == [0] and world.ledger.marks == [0]
    assert world.book.quality(0) == late
    assert world.book.get(0).operator_rewards == {OPS[0]: 1000}
    assert world.book.get(0).cumulative == {OPS[0]: 1000}


def test_metrics_report_settled_and_waiting_epochs_and_chain_errors(world):
    from settlement.metrics import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels)

    settler = world.settler()
    settler.ensure_contract()
    gas_before = value("meritnet_settlement_gas_used_total") or 0
    assert settler.tick() == [0, 1, 2]
    assert value("meritnet_settlement_last_settled_epoch") == 2
    assert value("meritnet_settlement_epochs_waiting") == 0
    last = value("meritnet_settlement_last_settle_gas")
    assert 21_000 < last <= 80_000  # a settle tx's gas, within the contract's goal
    assert value("meritnet_settlement_gas_used_total") - gas_before >= 3 * 21_000  # three mined settles
    before = value("meritnet_settlement_chain_errors_total", kind="unavailable") or 0
    world.chain._rpc = lambda call: (_ for _ in ()).throw(ChainUnavailable("down"))
    world.clock.t = 5.5 * EPOCH_S
    with pytest.raises(ChainUnavailable):
        settler.tick()  # epochs 3 and 4 close and wait
    assert value("meritnet_settlement_epochs_waiting") == 2
    assert value("meritnet_settlement_chain_errors_total", kind="unavailable") == before + 1


def test_each_epoch_settles_once_the_last_root_has_left_its_veto_window(world):
    """By default a deployed distributor gets a veto window of half an epoch; the settler waits it out
    (stuck: root_pending), then settles the next epoch, and adopts nothing it did not post."""
    from settlement import metrics

    world.config = SettlementConfig(epoch_length_s=EPOCH_S, emission_wei=1000)
    settler = world.settler()
    settler.ensure_contract()
    assert world.chain.claim_delay() == EPOCH_S // 2
    assert settler.tick() == [0]  # epochs 0..2 have ended; 1 waits for epoch 0's window
    assert metrics.STUCK.labels("root_pending")._value.get() == 1
    assert world.chain.reward_root() == b"\0" * 32  # nothing claimable yet
    next_block_at(world.chain, world.chain.claimable_at())
    assert settler.tick() == [1]
    assert world.chain.reward_root() == world.book.get(0).reward_root


def test_a_vetoed_epoch_stops_the_settler(world):
    world.config = SettlementConfig(epoch_length_s=EPOCH_S, emission_wei=1000)
    settler = world.settler()
    settler.ensure_contract()
    assert settler.tick() == [0]
    world.chain.transact(world.key, "veto")  # the settler deployed it, so it is also the admin here
    next_block_at(world.chain, world.chain.timestamp() + int(EPOCH_S))
    with pytest.raises(SettlementConflict, match="vetoed"):
        settler.tick()


def test_the_veto_window_must_be_shorter_than_an_epoch():
    with pytest.raises(ValueError, match="shorter than an epoch"):
        SettlementConfig(epoch_length_s=60, claim_delay_s=60)
