"""The contract and the settler on a real node: anvil on 127.0.0.1, stopped and restarted with --state."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from settlement.anvil import Anvil
from settlement.chain import Chain, ChainUnavailable
from settlement.chain_settings import ChainSettings
from settlement.config import SettlementConfig
from settlement.fees import fees_of_raw
from settlement.keys import SettlerKey
from settlement.rewardbook import RewardBook
from settlement.settler import Settler
from tests.support.clock import Clock
from tests.support.settlement_chain import ENDED, expect_revert, funded_key
from tests.support.settlement_scenarios import (
    CLAIM_GAS_GOAL,
    SETTLE_GAS_GOAL,
    contract_scenario,
    epoch_clock_scenario,
    idle_chain_scenario,
    roles_scenario,
    veto_scenario,
)
from tests.support.settler_fakes import EPOCH_S, FakeLedger, equal_split

pytestmark = pytest.mark.integration


@pytest.fixture
def anvil(tmp_path):
    node = Anvil(state_file=tmp_path / "anvil-state.json").start()
    yield node
    node.stop()


def connect(node: Anvil, **kw) -> Chain:
    return Chain.connect(ChainSettings(url=node.url, **kw))


def test_contract_scenario_on_anvil(anvil):
    gas = contract_scenario(connect(anvil))
    assert gas["settle"] <= SETTLE_GAS_GOAL and gas["claim_again"] <= CLAIM_GAS_GOAL


def test_roles_scenario_on_anvil(anvil):
    roles_scenario(connect(anvil))


def test_veto_scenario_on_anvil(anvil):
    veto_scenario(connect(anvil))


def test_epoch_clock_scenario_on_anvil(anvil):
    epoch_clock_scenario(connect(anvil))


def test_idle_chain_scenario_on_anvil(anvil):
    idle_chain_scenario(connect(anvil))


def test_cli_accept_settler_takes_the_proposed_role(anvil, tmp_path):
    """`meritnet settlement accept-settler --key-file K`: the second step of a settler rotation."""
    from typer.testing import CliRunner

    from settlement.cli import app

    chain = connect(anvil)
    admin, settler, successor, stranger = (funded_key(chain) for _ in range(4))
    chain.deploy(settler, 0, 1000, admin.address, **ENDED)
    chain.transact(admin, "propose_settler", successor.address)

    def accept(key: SettlerKey):
        key_file = tmp_path / f"{key.address}.key"
        key_file.touch(mode=0o600)
        key_file.write_text(key.export_hex())
        args = [
            "accept-settler",
            "--key-file",
            str(key_file),
            "--contract",
            chain.address,
            "--url",
            anvil.url,
        ]
        return CliRunner().invoke(app, args)

    refused = accept(stranger)
    assert refused.exit_code == 1 and "is not the proposed settler" in refused.output, refused.output
    assert chain.settler() == settler.address
    accepted = accept(successor)
    assert accepted.exit_code == 0, accepted.output
    assert f"{successor.address} is now the settler" in accepted.output
    assert chain.settler() == successor.address and chain.pending_settler() == "0x" + "00" * 20
    expect_revert("NotSettler", chain.preflight_settle, settler.address, 0, b"\1" * 32, b"\1" * 32, 1, 1)
    chain.preflight_settle(successor.address, 0, b"\1" * 32, b"\1" * 32, 1, 1)


def test_cli_set_stake_records_a_validators_stake_for_the_admin_only(anvil, tmp_path):
    """`meritnet settlement set-stake`: the stake record consensus reads, written by the admin."""
    from typer.testing import CliRunner

    from settlement.cli import app

    chain = connect(anvil)
    admin, settler, validator = (funded_key(chain) for _ in range(3))
    chain.deploy(settler, 0, 1000, admin.address, **ENDED)

    def set_stake(key: SettlerKey, stake: str):
        key_file = tmp_path / f"{key.address}.key"
        key_file.touch(mode=0o600)
        key_file.write_text(key.export_hex())
        args = ["set-stake", "--validator", validator.address, "--stake", stake]
        args += ["--admin-key-file", str(key_file), "--contract", chain.address, "--url", anvil.url]
        return CliRunner().invoke(app, args)

    refused = set_stake(settler, "5")
    assert refused.exit_code == 1 and f"the admin is {admin.address}" in refused.output, refused.output
    done = set_stake(admin, "2.5")
    assert done.exit_code == 0 and "has stake 2.5" in done.output, done.output
    assert chain.stake(validator.address) == 25 * 10**17
    assert set_stake(admin, "-1").exit_code == 2  # typer's usage error: a stake is >= 0


def _world(tmp_path, chain: Chain, key: SettlerKey):
    w = SimpleNamespace(
        chain=chain,
        key=key,
        ledger=FakeLedger(),
        book=RewardBook(tmp_path / "book.sqlite"),
        clock=Clock(3.5 * EPOCH_S),
        config=SettlementConfig(epoch_length_s=EPOCH_S, emission_wei=10**18, claim_delay_s=0),
    )
    w.settler = lambda: Settler(
        w.ledger, w.chain, w.key, w.book, w.config, clock=w.clock, rewards=equal_split
    )
    return w


def test_anvil_stopped_and_restarted_with_state_mid_run(anvil, tmp_path):
    chain = connect(anvil, receipt_timeout_s=5)
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    w = _world(tmp_path, chain, key)
    settler = w.settler()
    settler.ensure_contract()
    assert settler.tick() == [0, 1, 2]

    anvil.stop()  # dumps the chain state to --state
    w.clock.t = 6.5 * EPOCH_S
    with pytest.raises(ChainUnavailable):
        settler.tick()  # epochs 3..5 close and queue
    assert w.ledger.last_closed_epoch() == 5 and sorted(w.ledger.settled_tx) == [0, 1, 2]

    node = Anvil(port=anvil.port, state_file=anvil.state_file).start()
    try:
        assert chain.next_epoch() == 3  # the restarted chain kept the settled epochs
        assert settler.tick() == [3, 4, 5]
        assert [e["epoch"] for e in chain.settled_events()] == [0, 1, 2, 3, 4, 5]
        assert chain.total_rewarded() == 6 * 10**18
    finally:
        node.stop()


def test_tx_dropped_by_a_restarted_node_is_resigned_with_bumped_fees(anvil, tmp_path):
    chain = connect(anvil, receipt_timeout_s=1)
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    w = _world(tmp_path, chain, key)
    settler = w.settler()
    settler.ensure_contract()
    anvil.rpc("evm_setAutomine", [False])
    assert settler.tick() == []  # broadcast, never mined
    pending = w.ledger.pending_tx(0)
    pending_hash = bytes.fromhex(pending.tx_hash[2:])
    assert chain.tx_info(pending_hash).state == "pending"
    anvil.stop()  # the mempool is not part of --state: the tx is dropped

    node = Anvil(port=anvil.port, state_file=anvil.state_file).start()
    try:
        assert chain.tx_info(pending_hash).state == "unknown"
        assert w.settler().tick() == [0, 1, 2]
        first = chain.w3.eth.get_transaction(w.ledger.settled_tx[0])
        assert first["nonce"] == pending.nonce and bytes(first["hash"]) != pending_hash
        assert [e["epoch"] for e in chain.settled_events()] == [0, 1, 2]
    finally:
        node.stop()


def test_settled_events_are_read_in_bounded_block_ranges_from_the_deploy_block(anvil, tmp_path):
    chain = connect(anvil, log_chunk_blocks=3, receipt_timeout_s=5)
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    anvil.rpc("anvil_mine", ["0x5"])  # blocks before the deploy are never read
    w = _world(tmp_path, chain, key)
    settler = w.settler()
    settler.ensure_contract()
    assert chain.deploy_block > 5
    assert settler.tick() == [0, 1, 2]
    anvil.rpc("anvil_mine", ["0xa"])
    latest = chain.w3.eth.block_number
    assert latest - chain.deploy_block >= 12  # far more blocks than one page

    ranges = []
    get_logs = chain.w3.eth.get_logs

    def recording(params):
        ranges.append((int(params["fromBlock"]), int(params["toBlock"])))
        return get_logs(params)

    chain.w3.eth.get_logs = recording
    assert [e["epoch"] for e in chain.settled_events()] == [0, 1, 2]
    assert [e["epoch"] for e in chain.settled_events(1)] == [1]
    pages = ranges[: len(ranges) // 2]
    assert pages[0][0] == chain.deploy_block and pages[-1][1] == latest
    assert all(end - start + 1 <= 3 for start, end in ranges)
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(pages))  # contiguous, no gap
    # A client bound to the same contract with its deploy block reads the same history.
    bound = connect(anvil, contract=chain.address, deploy_block=chain.deploy_block, log_chunk_blocks=4)
    assert [e["epoch"] for e in bound.settled_events()] == [0, 1, 2]


def test_an_underpriced_pending_tx_is_repriced_at_the_same_nonce_up_to_the_cap(anvil, tmp_path):
    cap = 40 * 10**9
    chain = connect(anvil, receipt_timeout_s=0.5, reprice_after_blocks=2, max_fee_cap_wei=cap)
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    w = _world(tmp_path, chain, key)
    w.clock.t = 1.5 * EPOCH_S  # one epoch due
    settler = w.settler()
    settler.ensure_contract()
    anvil.rpc("evm_setAutomine", [False])
    assert settler.tick() == []  # broadcast at market fees, not mined
    first = w.ledger.pending_tx(0)
    _, first_fees = fees_of_raw(first.raw_tx)
    # The market moves: the base fee jumps far above the tx's max fee, so it is stuck.
    anvil.rpc("anvil_setNextBlockBaseFeePerGas", [hex(20 * first_fees.max_fee)])
    seen = [first_fees]
    for _ in range(30):
        anvil.rpc("anvil_mine", ["0x2"])  # only txs paying the base fee get in
        if settler.tick() == [0]:
            break
        nonce, fees = fees_of_raw(w.ledger.pending_tx(0).raw_tx)
        assert nonce == first.nonce and fees.max_fee <= cap
        if fees != seen[-1]:
            # each re-pricing is >= 12.5% higher, or at the cap
            assert 8 * fees.max_fee >= 9 * seen[-1].max_fee or fees.max_fee == cap
            seen.append(fees)
    else:
        pytest.fail("the stuck settle tx was never re-priced into a block")
    assert len(seen) > 1  # re-priced, not rebroadcast unchanged
    mined = chain.w3.eth.get_transaction(w.ledger.settled_tx[0])
    assert mined["nonce"] == first.nonce and first_fees.max_fee < mined["maxFeePerGas"] <= cap
    assert [e["epoch"] for e in chain.settled_events()] == [0] and w.ledger.marks == [0]
    assert settler.tick() == []  # exactly once


def test_later_epochs_are_computed_behind_a_stuck_tx_and_settle_in_order_once_it_is_mined(anvil, tmp_path):
    from settlement.metrics import REGISTRY

    chain = connect(anvil, receipt_timeout_s=0.5)
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    w = _world(tmp_path, chain, key)  # t = 3.5 epochs: epochs 0..2 are due
    settler = w.settler()
    settler.ensure_contract()
    anvil.rpc("evm_setAutomine", [False])
    for _ in range(2):
        assert settler.tick() == []  # epoch 0's tx is broadcast (then rebroadcast), never mined
    # The chain takes settle(next_epoch) only, so 1 and 2 wait to be sent, but they are computed.
    assert [w.book.get(e).epoch for e in range(3)] == [0, 1, 2]
    assert w.ledger.pending_tx(0) is not None
    assert w.ledger.pending_tx(1) is None and w.ledger.pending_tx(2) is None
    assert REGISTRY.get_sample_value("meritnet_settlement_stuck", {"state": "receipt"}) == 1
    assert REGISTRY.get_sample_value("meritnet_settlement_last_committed_epoch") == 2
    assert REGISTRY.get_sample_value("meritnet_settlement_last_settled_epoch") == -1

    anvil.rpc("evm_setAutomine", [True])
    settled: list[int] = []
    for _ in range(10):
        anvil.rpc("anvil_mine", ["0x1"])
        settled += w.settler().tick()  # a restart on the way changes nothing
        if settled == [0, 1, 2]:
            break
    assert settled == [0, 1, 2] and [e["epoch"] for e in chain.settled_events()] == [0, 1, 2]
    assert w.ledger.marks == [0, 1, 2] and chain.total_rewarded() == 3 * 10**18
    assert REGISTRY.get_sample_value("meritnet_settlement_stuck", {"state": "receipt"}) == 0
