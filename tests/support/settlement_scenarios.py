"""Scenarios of the distributor contract that run on both chains: on py-evm (eth-tester) by
tests/unit/test_settlement_chain.py and on anvil by tests/integration/test_settlement_anvil.py."""

from __future__ import annotations

import time

from web3 import Web3

from settlement.chain import Chain
from tests.support.settlement_chain import (
    BIG_CAP,
    ENDED,
    ZERO,
    events,
    expect_revert,
    funded_key,
    next_block_at,
    oz_tree,
    send_settle,
    settle,
)

# ~82k; the settle contract_scenario measures also turns previous_root non-zero (+17,100 once)
SETTLE_GAS_GOAL = 100_000
CLAIM_GAS_GOAL = 100_000


def contract_scenario(chain: Chain) -> dict[str, int]:
    """Settle three epochs, claim cumulatively, and hit every rejection. Returns measured gas."""
    settler, stranger = funded_key(chain), funded_key(chain)
    ops = [funded_key(chain).address for _ in range(3)]
    chain.deploy(settler, first_epoch=5, emission_cap=BIG_CAP, **ENDED)
    assert chain.next_epoch() == 5 and chain.settler() == settler.address
    usage_root = Web3.keccak(text="usage")

    # Epoch 5: ops 0 and 1 earn. Only the settler may post; only epoch 5 is next.
    cum5 = {ops[0]: 600, ops[1]: 400}
    root5, proofs5 = oz_tree(["address", "uint256"], [[a, v] for a, v in cum5.items()])
    expect_revert("NotSettler", chain.preflight_settle, stranger.address, 5, usage_root, root5, 10, 1000)
    expect_revert("EpochOutOfOrder", chain.preflight_settle, settler.address, 6, usage_root, root5, 10, 1000)
    first = settle(chain, settler, 5, usage_root, root5, 10, 1000)
    expect_revert(
        "EpochAlreadySettled", chain.preflight_settle, settler.address, 5, usage_root, root5, 10, 1000
    )
    assert (
        chain.usage_root(5) == usage_root and chain.reward_root() == root5 and chain.total_rewarded() == 1000
    )

    claim0 = chain.claim(stranger, ops[0], 600, proofs5[0])  # anyone may claim; tokens go to the operator
    assert (
        claim0["status"] == 1 and chain.balance_of(ops[0]) == 600 and chain.balance_of(stranger.address) == 0
    )
    expect_revert("NothingToClaim", chain.claim, stranger, ops[0], 600, proofs5[0])
    expect_revert("InvalidProof", chain.claim, stranger, ops[1], 401, proofs5[1])  # amount not in the tree
    expect_revert("InvalidProof", chain.claim, stranger, ops[2], 400, proofs5[1])  # someone else's proof
    assert chain.balance_of(ops[0]) == 600 and chain.balance_of(ops[2]) == 0

    # Epochs 6, 7: cumulative amounts grow; a claim pays only the difference.
    cum6 = {ops[0]: 900, ops[1]: 700, ops[2]: 400}
    root6, proofs6 = oz_tree(["address", "uint256"], [[a, v] for a, v in cum6.items()])
    steady = settle(chain, settler, 6, usage_root, root6, 12, 1000)
    second_claim = chain.claim(stranger, ops[0], 900, proofs6[0])
    assert chain.balance_of(ops[0]) == 900 and chain.claimed(ops[0]) == 900
    expect_revert("InvalidProof", chain.claim, stranger, ops[1], 400, proofs5[1])  # stale root
    chain.claim(stranger, ops[1], 700, proofs6[1])
    chain.claim(stranger, ops[2], 400, proofs6[2])
    assert chain.total_supply() == 2000 == chain.total_rewarded()

    # A root promising more than was posted cannot mint it.
    greedy = {ops[2]: 10**6, ops[0]: 900}
    root7, proofs7 = oz_tree(["address", "uint256"], [[a, v] for a, v in greedy.items()])
    settle(chain, settler, 7, usage_root, root7, 1, 5)
    expect_revert("ExceedsRewarded", chain.claim, stranger, ops[2], 10**6, proofs7[0])

    events = chain.settled_events()
    assert [e["epoch"] for e in events] == [5, 6, 7] and events[1]["reward_root"] == root6
    return {
        "settle_first": first["gasUsed"],
        "settle": steady["gasUsed"],
        "claim_first": claim0["gasUsed"],
        "claim_again": second_claim["gasUsed"],
    }


def roles_scenario(chain: Chain) -> None:
    """The emission cap, admin/settler separation, pause, two-step rotation of both roles and the
    zero address, each refusal checked by its custom error."""
    admin, settler, successor, stranger = (funded_key(chain) for _ in range(4))
    cap = 1000
    root = Web3.keccak(text="root")

    # No role ever goes to the zero address, from the constructor either.
    expect_revert("ZeroAddress", chain.deploy, settler, 0, cap, ZERO, **ENDED)
    factory = chain.w3.eth.contract(abi=chain.artifact["abi"], bytecode=chain.artifact["bytecode"])
    no_settler = factory.constructor("n", "s", admin.address, ZERO, 0, cap, 0, 1, 0).data_in_transaction
    expect_revert(
        "ZeroAddress",
        chain._raise_by_name,
        lambda: chain.w3.eth.call({"from": admin.address, "data": no_settler}),
    )
    chain.deploy(settler, 0, cap, admin.address, **ENDED)
    assert (chain.admin(), chain.settler(), chain.emission_cap(), chain.paused()) == (
        admin.address,
        settler.address,
        cap,
        False,
    )
    for name, role, holder in (("AdminChanged", "admin", admin), ("SettlerChanged", "settler", settler)):
        logs = getattr(chain.contract.events, name).get_logs(from_block=0)
        assert [dict(e["args"]) for e in logs] == [{"previous": ZERO, role: holder.address}]

    # The cap: exactly the cap settles, one wei more is refused (and says by how much).
    over = expect_revert(
        "EmissionCapExceeded", chain.preflight_settle, settler.address, 0, root, root, 1, cap + 1
    )
    assert over.error_args == (cap + 1, cap)
    settle(chain, settler, 0, root, root, 1, cap)
    assert chain.total_rewarded() == cap

    # Separation: the settler cannot pause or hand out roles; the admin cannot settle.
    expect_revert("NotAdmin", chain.transact, settler, "pause")
    expect_revert("NotAdmin", chain.transact, settler, "propose_settler", successor.address)
    expect_revert("NotAdmin", chain.transact, settler, "propose_admin", settler.address)
    expect_revert("NotSettler", chain.preflight_settle, admin.address, 1, root, root, 1, 1)

    # The stake record consensus reads: only the admin writes it, never to the zero address.
    assert chain.stake(stranger.address) == 0
    expect_revert("NotAdmin", chain.transact, settler, "set_stake", settler.address, 10**20)
    expect_revert("NotAdmin", chain.transact, stranger, "set_stake", stranger.address, 1)
    expect_revert("ZeroAddress", chain.transact, admin, "set_stake", ZERO, 1)
    staked = chain.transact(admin, "set_stake", stranger.address, 3 * 10**18)
    assert events(chain, staked, "StakeSet") == [
        {"validator": stranger.address, "previous": 0, "stake": 3 * 10**18}
    ]
    chain.transact(admin, "set_stake", stranger.address, 0)
    assert chain.stake(stranger.address) == 0

    # Pause stops settle until the admin unpauses; pausing twice or unpausing twice is refused.
    assert events(chain, chain.transact(admin, "pause"), "Paused") == [{"account": admin.address}]
    assert chain.paused()
    expect_revert("EnforcedPause", chain.preflight_settle, settler.address, 1, root, root, 1, 1)
    expect_revert("EnforcedPause", chain.transact, admin, "pause")
    expect_revert("NotAdmin", chain.transact, settler, "unpause")
    assert events(chain, chain.transact(admin, "unpause"), "Unpaused") == [{"account": admin.address}]
    expect_revert("ExpectedPause", chain.transact, admin, "unpause")
    settle(chain, settler, 1, root, root, 1, 1)

    # Settler rotation takes two steps: the admin proposes, the new key accepts.
    expect_revert("ZeroAddress", chain.transact, admin, "propose_settler", ZERO)
    proposed = chain.transact(admin, "propose_settler", successor.address)
    assert events(chain, proposed, "SettlerProposed") == [
        {"settler": settler.address, "proposed": successor.address}
    ]
    assert chain.settler() == settler.address  # nothing changes until the new key accepts
    expect_revert("NotPendingSettler", chain.transact, stranger, "accept_settler")
    accepted = chain.transact(successor, "accept_settler")
    assert events(chain, accepted, "SettlerChanged") == [
        {"previous": settler.address, "settler": successor.address}
    ]
    expect_revert("NotPendingSettler", chain.transact, successor, "accept_settler")  # proposal used up
    expect_revert("NotSettler", chain.preflight_settle, settler.address, 2, root, root, 1, 1)
    settle(chain, successor, 2, root, root, 1, 1)

    # The admin role moves the same way (e.g. to a multisig).
    expect_revert("ZeroAddress", chain.transact, admin, "propose_admin", ZERO)
    expect_revert("NotAdmin", chain.transact, stranger, "propose_admin", stranger.address)
    proposed = chain.transact(admin, "propose_admin", stranger.address)
    assert events(chain, proposed, "AdminProposed") == [
        {"admin": admin.address, "proposed": stranger.address}
    ]
    expect_revert("NotPendingAdmin", chain.transact, admin, "accept_admin")
    accepted = chain.transact(stranger, "accept_admin")
    assert events(chain, accepted, "AdminChanged") == [{"previous": admin.address, "admin": stranger.address}]
    assert chain.admin() == stranger.address
    expect_revert("NotAdmin", chain.transact, admin, "pause")
    chain.transact(stranger, "pause")
    expect_revert("EnforcedPause", chain.preflight_settle, successor.address, 3, root, root, 1, 1)


def veto_scenario(chain: Chain) -> None:
    """Issue 28 item 15, a leaked settler key: it settles one epoch within the cap with a root that
    pays the thief every unclaimed reward. The root is pending for claim_delay, so neither the
    thief nor anyone claims from it; the admin vetoes it in time, the thief gets nothing, the honest
    operator claims what the last accepted root gave it, and the epoch is settled again honestly."""
    admin, settler, thief, payer = (funded_key(chain) for _ in range(4))
    honest, other = funded_key(chain).address, funded_key(chain).address
    cap, delay = 1000, 100
    usage = Web3.keccak(text="usage")
    chain.deploy(settler, 0, cap, admin.address, **ENDED, claim_delay=delay)
    assert chain.claim_delay() == delay

    # Epoch 0, honest: pending for the delay (claims and the next settle wait), then claimable.
    root0, proofs0 = oz_tree(["address", "uint256"], [[honest, 600], [other, 400]])
    posted = settle(chain, settler, 0, usage, root0, 2, 1000)
    until0 = events(chain, posted, "EpochSettled")[0]["claimable_at"]
    assert until0 == chain.w3.eth.get_block(posted["blockNumber"])["timestamp"] + delay
    assert chain.latest_root() == root0 and chain.reward_root() == b"\0" * 32
    early = expect_revert("RootPending", chain.claim, payer, honest, 600, proofs0[0])
    assert early.error_args == (0, until0)
    assert expect_revert(
        "RootPending", chain.preflight_settle, settler.address, 1, usage, root0, 1, 1
    ).error_args == (
        0,
        until0,
    )
    next_block_at(chain, until0)
    assert chain.reward_root() == root0
    chain.claim(payer, honest, 600, proofs0[0])

    # The key leaks: epoch 1 within the cap, with a root paying the thief all that is unclaimed.
    loot = 400 + cap
    stolen, (thief_proof,) = oz_tree(["address", "uint256"], [[thief.address, loot]])
    posted = settle(chain, settler, 1, Web3.keccak(text="forged"), stolen, 1, cap)
    until1 = events(chain, posted, "EpochSettled")[0]["claimable_at"]
    assert chain.total_rewarded() == 2000 and chain.reward_root() == root0
    assert expect_revert("RootPending", chain.claim, thief, thief.address, loot, thief_proof).error_args == (
        1,
        until1,
    )
    # Pause stops claims too (before this fix it stopped settle only).
    chain.transact(admin, "pause")
    expect_revert("EnforcedPause", chain.claim, payer, other, 400, proofs0[1])
    # Only the admin vetoes.
    for stranger in (settler, thief):
        expect_revert("NotAdmin", chain.transact, stranger, "veto")
    vetoed = chain.transact(admin, "veto")
    assert events(chain, vetoed, "RootVetoed") == [{"epoch": 1, "reward_root": stolen, "epoch_reward": cap}]
    assert chain.vetoed_events(1)[0]["reward_root"] == stolen
    # The epoch is taken back whole: it settles again, its usage root is gone, the total is as before.
    assert (chain.next_epoch(), chain.total_rewarded(), chain.usage_root(1)) == (1, 1000, b"\0" * 32)
    assert (chain.latest_root(), chain.claimable_at()) == (root0, 0)
    expect_revert("NoPendingRoot", chain.transact, admin, "veto")
    chain.transact(admin, "unpause")

    # Long after the window, the thief's proof is worth nothing; the honest operators' still are.
    next_block_at(chain, until1 + delay)
    expect_revert("InvalidProof", chain.claim, thief, thief.address, loot, thief_proof)
    chain.claim(payer, other, 400, proofs0[1])
    assert chain.balance_of(thief.address) == 0 and chain.total_supply() == 1000

    # Epoch 1 again, honestly; once its window has passed the admin can no longer take it back.
    root1, proofs1 = oz_tree(["address", "uint256"], [[honest, 1100], [other, 900]])
    posted = settle(chain, settler, 1, usage, root1, 2, cap)
    until = events(chain, posted, "EpochSettled")[0]["claimable_at"]
    assert chain.total_rewarded() == 2000 and chain.usage_root(1) == usage
    next_block_at(chain, until)
    assert expect_revert("NoPendingRoot", chain.transact, admin, "veto").error_args == (until,)
    chain.claim(payer, honest, 1100, proofs1[0])
    assert chain.balance_of(honest) == 1100 and chain.total_supply() == 1500


def epoch_clock_scenario(chain: Chain) -> None:
    """Epochs are tied to time: settle(e) is refused until the chain's clock reaches e's end
    (EpochNotEnded names the epoch and that end) and accepted at exactly the end, so a leaked
    settler key can mint at most the cap per epoch that has ended, never ahead of time."""
    settler = funded_key(chain)
    cap, length = 1000, 100
    genesis = chain.timestamp() + 1000  # epoch 0 lies ahead: the test moves the chain's clock
    root = Web3.keccak(text="root")
    expect_revert("ZeroEpochLength", chain.deploy, settler, 0, cap, genesis=genesis, epoch_length=0)
    chain.deploy(settler, 0, cap, genesis=genesis, epoch_length=length)
    assert chain.epochs() == (genesis, length)

    # Before genesis: refused, saying when the epoch ends.
    early = expect_revert("EpochNotEnded", chain.preflight_settle, settler.address, 0, root, root, 1, cap)
    assert early.error_args == (0, genesis + length)
    # A settle mined one second before the end reverts; one mined at the end exactly settles.
    next_block_at(chain, genesis + length - 1)
    assert send_settle(chain, settler, 0, root, root, 1, cap)["status"] == 0
    assert chain.next_epoch() == 0 and chain.total_rewarded() == 0
    next_block_at(chain, genesis + length)
    receipt = settle(chain, settler, 0, root, root, 1, cap)
    assert chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == genesis + length

    # The settler key leaks: the next epoch is still running, so it cannot be posted; later ones
    # are out of order. Only epochs that have ended can be, each at most the cap.
    leaked = settler
    running = expect_revert("EpochNotEnded", chain.preflight_settle, leaked.address, 1, root, root, 1, cap)
    assert running.error_args == (1, genesis + 2 * length)
    expect_revert("EpochOutOfOrder", chain.preflight_settle, leaked.address, 2, root, root, 1, cap)
    next_block_at(chain, genesis + 3 * length + length // 2)  # epochs 1 and 2 have ended, 3 has not
    chain.fund(leaked.address, 1)  # mines that block
    settle(chain, leaked, 1, root, root, 1, cap)
    settle(chain, leaked, 2, root, root, 1, cap)
    ahead = expect_revert("EpochNotEnded", chain.preflight_settle, leaked.address, 3, root, root, 1, cap)
    assert ahead.error_args == (3, genesis + 4 * length)
    assert chain.next_epoch() == 3 and chain.total_rewarded() == 3 * cap  # cap x ended epochs


def idle_chain_scenario(chain: Chain) -> None:
    """A chain that mines only on transactions (anvil, the embedded one) still settles an epoch as
    soon as it ends: settle is simulated against the pending block, which carries the clock's time."""
    settler = funded_key(chain)
    length = 100
    # py-evm stamps blocks one second apart even within one second, so its clock may run ahead.
    now = max(int(time.time()), chain.timestamp() + 1)
    genesis = now + 2 - length  # epoch 0 ends in 2 s
    chain.deploy(settler, 0, 1, genesis=genesis, epoch_length=length)
    root = Web3.keccak(text="root")
    expect_revert("EpochNotEnded", chain.preflight_settle, settler.address, 0, root, root, 1, 1)
    time.sleep(max(0.0, genesis + length - time.time()) + 1.1)  # no block is mined meanwhile
    assert chain.timestamp() < genesis + length  # the latest block is older than the epoch's end
    chain.preflight_settle(settler.address, 0, root, root, 1, 1)
    receipt = settle(chain, settler, 0, root, root, 1, 1)
    assert chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] >= genesis + length
