"""The distributor contract on the embedded chain (py-evm via eth-tester): settle, claim, roles, every error.

`contract_scenario`, `roles_scenario`, `epoch_clock_scenario` and `idle_chain_scenario` are also run against anvil by
tests/integration/test_settlement_anvil.py. The proofs here come from a tiny independent OpenZeppelin-StandardMerkleTree builder (below), so the
contract's leaf encoding is checked against the standard itself, not only against our own builder.
"""

from __future__ import annotations

import json
import time

import pytest
from eth_abi import encode
from web3 import Web3
from web3.logs import DISCARD

from settlement.chain import Chain, ContractReverted
from settlement.compile import ARTIFACT_PATH, compile_artifact
from settlement.keys import SettlerKey

SETTLE_GAS_GOAL = 80_000
CLAIM_GAS_GOAL = 100_000
BIG_CAP = 10**27  # emission cap for tests about something else
ENDED = {
    "genesis": 0,
    "epoch_length": 1,
}  # every epoch below today's unix time has ended: tests about something else
ZERO = "0x" + "00" * 20


def oz_leaf(types: list[str], values: list) -> bytes:
    return Web3.keccak(Web3.keccak(encode(types, values)))


def oz_tree(types: list[str], values: list[list]) -> tuple[bytes, list[list[bytes]]]:
    """Root and per-value proofs, built the way @openzeppelin/merkle-tree builds them."""
    leaves = [oz_leaf(types, v) for v in values]
    order = sorted(range(len(leaves)), key=lambda i: leaves[i])  # ascending, as OZ sorts
    n = len(leaves)
    tree: list[bytes] = [b""] * (2 * n - 1)
    for k, i in enumerate(order):
        tree[len(tree) - 1 - k] = leaves[i]
    for i in range(len(tree) - 1 - n, -1, -1):
        a, b = sorted([tree[2 * i + 1], tree[2 * i + 2]])
        tree[i] = Web3.keccak(a + b)
    proofs = []
    for i in range(n):
        j = len(tree) - 1 - order.index(i)
        proof = []
        while j > 0:
            proof.append(tree[j - (-1) ** (j % 2)])  # sibling
            j = (j - 1) // 2
        proofs.append(proof)
    return tree[0], proofs


def funded_key(chain: Chain) -> SettlerKey:
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    return key


def send_settle(
    chain: Chain, key: SettlerKey, epoch: int, usage_root: bytes, reward_root: bytes, n: int, amount: int
):
    """A settle tx sent without simulating it first, so it is mined even if it reverts."""
    raw = chain.sign_settle(
        key, epoch, usage_root, reward_root, n, amount, chain.nonce(key.address), chain.fees()
    )
    receipt = chain.wait_receipt(chain.send_raw(raw))
    assert receipt is not None
    return receipt


def settle(
    chain: Chain, key: SettlerKey, epoch: int, usage_root: bytes, reward_root: bytes, n: int, amount: int
):
    receipt = send_settle(chain, key, epoch, usage_root, reward_root, n, amount)
    assert receipt["status"] == 1
    return receipt


def next_block_at(chain: Chain, timestamp: int) -> None:
    """Make the chain's next block carry `timestamp` (a dev chain's clock may only move forward)."""
    provider = chain.w3.provider
    if hasattr(provider, "ethereum_tester"):  # py-evm: mines a block at timestamp - 1; the next is +1
        provider.ethereum_tester.time_travel(timestamp)
    else:  # anvil
        reply = provider.make_request("evm_setNextBlockTimestamp", [timestamp])
        assert "error" not in reply, reply


def expect_revert(error: str, fn, *args, **kwargs) -> ContractReverted:
    with pytest.raises(ContractReverted) as info:
        fn(*args, **kwargs)
    assert info.value.error == error
    return info.value


def events(chain: Chain, receipt, name: str) -> list[dict]:
    """The `name` events a receipt carries, as dicts of their arguments."""
    logs = getattr(chain.contract.events, name)().process_receipt(receipt, errors=DISCARD)
    return [dict(e["args"]) for e in logs]


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


def test_contract_scenario_on_eth_tester():
    gas = contract_scenario(Chain.embedded())
    assert gas["settle"] <= SETTLE_GAS_GOAL
    assert gas["claim_first"] <= CLAIM_GAS_GOAL and gas["claim_again"] <= CLAIM_GAS_GOAL


def test_settle_gas_does_not_depend_on_tree_size():
    chain = Chain.embedded()
    key = funded_key(chain)
    chain.deploy(key, first_epoch=0, emission_cap=BIG_CAP, **ENDED)
    settle(chain, key, 0, Web3.keccak(text="u"), Web3.keccak(text="r"), 1, 1)
    gas = {
        settle(chain, key, e, Web3.keccak(text=f"u{e}"), Web3.keccak(text=f"r{e}"), n, n * 10**18)["gasUsed"]
        for e, n in enumerate([10, 1000, 10**6], start=1)
    }
    # Roots are 32 bytes whatever the number of leaves; only calldata byte costs (4 vs 16 gas per
    # zero/non-zero byte of the totals) differ.
    assert max(gas) - min(gas) <= 100, gas


def roles_scenario(chain: Chain) -> None:
    """The emission cap, admin/settler separation, pause, two-step rotation of both roles and the
    zero address, each refusal checked by its custom error."""
    admin, settler, successor, stranger = (funded_key(chain) for _ in range(4))
    cap = 1000
    root = Web3.keccak(text="root")

    # No role ever goes to the zero address, from the constructor either.
    expect_revert("ZeroAddress", chain.deploy, settler, 0, cap, ZERO, **ENDED)
    factory = chain.w3.eth.contract(abi=chain.artifact["abi"], bytecode=chain.artifact["bytecode"])
    no_settler = factory.constructor("n", "s", admin.address, ZERO, 0, cap, 0, 1).data_in_transaction
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


def test_roles_scenario_on_eth_tester():
    roles_scenario(Chain.embedded())


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


def test_epoch_clock_scenario_on_eth_tester():
    epoch_clock_scenario(Chain.embedded())


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


def test_idle_chain_scenario_on_eth_tester():
    idle_chain_scenario(Chain.embedded())


def test_committed_artifact_matches_a_fresh_compile():
    committed = json.loads(ARTIFACT_PATH.read_text())
    fresh = compile_artifact()
    assert fresh["sources"] == committed["sources"], "sources changed: run `python -m settlement.compile`"
    assert fresh == committed
    assert {e["name"] for e in committed["abi"] if e["type"] == "error"} >= {
        "NotSettler",
        "EpochOutOfOrder",
        "EpochAlreadySettled",
        "InvalidProof",
        "NothingToClaim",
        "EmissionCapExceeded",
        "NotAdmin",
        "NotPendingSettler",
        "NotPendingAdmin",
        "ZeroAddress",
        "EnforcedPause",
        "ExpectedPause",
        "EpochNotEnded",
        "ZeroEpochLength",
    }


def test_reference_tree_matches_a_known_openzeppelin_root():
    # A single-leaf tree's root is its leaf; two leaves hash in sorted order.
    values = [
        ["0x1111111111111111111111111111111111111111", 5],
        ["0x2222222222222222222222222222222222222222", 7],
    ]
    root, proofs = oz_tree(["address", "uint256"], values)
    a, b = sorted(oz_leaf(["address", "uint256"], v) for v in values)
    assert root == Web3.keccak(a + b) and len(proofs[0]) == 1


def test_settlement_reward_tree_proofs_are_accepted_by_the_contract():
    """The off-chain builder (settlement.trees) and the on-chain verifier agree on the leaf encoding."""
    from settlement.trees import find_reward_leaf, reward_tree

    chain = Chain.embedded()
    settler, payer = funded_key(chain), funded_key(chain)
    chain.deploy(settler, first_epoch=0, emission_cap=BIG_CAP, **ENDED)
    cumulative = {SettlerKey.generate().address: 10**18 + i for i in range(9)}  # odd count: unbalanced tree
    tree = reward_tree(cumulative)
    settle(chain, settler, 0, b"\x00" * 32, bytes.fromhex(tree.root[2:]), 9, sum(cumulative.values()))
    for operator, amount in cumulative.items():
        proof = [bytes.fromhex(p[2:]) for p in tree.get_proof(find_reward_leaf(tree, operator))]
        chain.claim(payer, operator, amount, proof)
        assert chain.balance_of(operator) == amount
    assert oz_tree(["address", "uint256"], [list(v) for v in (tree.at(i) for i in range(len(tree)))])[
        0
    ] == bytes.fromhex(tree.root[2:])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://eth-mainnet.example.com/v2/SECRETKEY123", "https://eth-mainnet.example.com/..."),
        ("https://user:SECRETKEY123@rpc.example.com", "https://rpc.example.com/..."),
        ("https://rpc.example.com/?apikey=SECRETKEY123", "https://rpc.example.com/..."),
        ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
        ("embedded", "embedded"),
    ],
)
def test_rpc_urls_are_redacted_in_errors_and_reprs(url, shown):
    from settlement.chain import ChainSettings, redact_url

    assert redact_url(url) == shown and "SECRETKEY123" not in repr(ChainSettings(url=url))


def test_an_unreachable_chain_error_does_not_quote_the_key():
    from settlement.chain import Chain, ChainSettings, ChainUnavailable

    chain = Chain.connect(ChainSettings(url="http://127.0.0.1:9/v2/SECRETKEY123"))  # nothing listens on 9
    with pytest.raises(ChainUnavailable) as info:
        _ = chain.chain_id
    assert "SECRETKEY123" not in str(info.value) and "127.0.0.1:9" in str(info.value)
