"""Helpers for tests of the distributor contract, on py-evm (eth-tester) and on anvil alike: an
independent OpenZeppelin StandardMerkleTree builder, funded keys, settle without a preflight, the
chain's clock, reverts by name and events by name. The scenarios that run on both chains are in
tests/support/settlement_scenarios.py."""

from __future__ import annotations

import pytest
from eth_abi import encode
from web3 import Web3
from web3.logs import DISCARD

from settlement.chain import Chain, ContractReverted
from settlement.keys import SettlerKey

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
