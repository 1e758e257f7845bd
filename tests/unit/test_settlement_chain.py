"""The distributor contract on the embedded chain (py-evm via eth-tester): settle, claim, roles, the
veto window, every error.

The scenarios (tests/support/settlement_scenarios.py) run here and against anvil by
tests/integration/test_settlement_anvil.py. The proofs come from a tiny independent
OpenZeppelin-StandardMerkleTree builder (tests/support/settlement_chain.py), so the contract's leaf
encoding is checked against the standard itself, not only against our own builder.
"""

from __future__ import annotations

import json

import pytest
from web3 import Web3

from settlement.chain import Chain
from settlement.compile import ARTIFACT_PATH, compile_artifact
from settlement.keys import SettlerKey
from tests.support.settlement_chain import (
    BIG_CAP,
    ENDED,
    funded_key,
    oz_leaf,
    oz_tree,
    settle,
)
from tests.support.settlement_scenarios import (
    CLAIM_GAS_GOAL,
    SETTLE_GAS_GOAL,
    contract_scenario,
    epoch_clock_scenario,
    idle_chain_scenario,
    roles_scenario,
    veto_scenario,
)


def test_contract_scenario_on_eth_tester():
    gas = contract_scenario(Chain.embedded())
    assert gas["settle"] <= SETTLE_GAS_GOAL
    assert gas["claim_first"] <= CLAIM_GAS_GOAL and gas["claim_again"] <= CLAIM_GAS_GOAL


def test_settle_gas_does_not_depend_on_tree_size():
    chain = Chain.embedded()
    key = funded_key(chain)
    chain.deploy(key, first_epoch=0, emission_cap=BIG_CAP, **ENDED)
    for e in (0, 1):  # the first two settles fill empty slots (the second, previous_root)
        settle(chain, key, e, Web3.keccak(text=f"u{e}"), Web3.keccak(text=f"r{e}"), 1, 1)
    gas = {
        settle(chain, key, e, Web3.keccak(text=f"u{e}"), Web3.keccak(text=f"r{e}"), n, n * 10**18)["gasUsed"]
        for e, n in enumerate([10, 1000, 10**6], start=2)
    }
    # Roots are 32 bytes whatever the number of leaves; only calldata byte costs (4 vs 16 gas per
    # zero/non-zero byte of the totals) differ.
    assert max(gas) - min(gas) <= 100, gas


def test_roles_scenario_on_eth_tester():
    roles_scenario(Chain.embedded())


def test_a_leaked_settler_keys_root_is_vetoed_before_anyone_claims_from_it():
    veto_scenario(Chain.embedded())


def test_epoch_clock_scenario_on_eth_tester():
    epoch_clock_scenario(Chain.embedded())


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
        "RootPending",
        "NoPendingRoot",
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
    from settlement.chain_settings import ChainSettings, redact_url

    assert redact_url(url) == shown and "SECRETKEY123" not in repr(ChainSettings(url=url))


def test_an_unreachable_chain_error_does_not_quote_the_key():
    from settlement.chain import Chain, ChainUnavailable
    from settlement.chain_settings import ChainSettings

    chain = Chain.connect(ChainSettings(url="http://127.0.0.1:9/v2/SECRETKEY123"))  # nothing listens on 9
    with pytest.raises(ChainUnavailable) as info:
        _ = chain.chain_id
    assert "SECRETKEY123" not in str(info.value) and "127.0.0.1:9" in str(info.value)
