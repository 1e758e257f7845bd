"""Usage and reward trees: the fast usage path equals OZ's output, and the leaf encodings are the on-chain ones."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from eth_abi import encode as abi_encode
from eth_hash.auto import keccak

from settlement import (
    REWARD_LEAF_ENCODING,
    USAGE_LEAF_ENCODING,
    ZERO_ROOT,
    EmptyTreeError,
    StandardMerkleTree,
    UsageRow,
    find_reward_leaf,
    find_usage_leaf,
    reward_root,
    reward_tree,
    usage_leaf,
    usage_root,
    usage_tree,
)
from settlement.merkle import MerkleTreeError

VECTORS = json.loads((Path(__file__).parents[1] / "fixtures" / "oz_merkle" / "vectors.json").read_text())
CASES = {case["name"]: case for case in VECTORS["cases"]}
ADDR = [v[0] for v in CASES["rewards7"]["values"]]


def _usage11_epoch():
    """The rows that generate.js turned into the 'usage11' OZ tree (record 0 without body hashes)."""

    def sha(text: str, i: int) -> str:
        return hashlib.sha256(text.encode()).hexdigest() if i else ""

    rows = tuple(
        UsageRow(
            f"req-{i}",
            f"node-{i % 3}",
            ADDR[i % 7],
            "default",
            10 + i,
            100 * i,
            sha(f"body-{i}", i),
            sha(f"answer-{i}", i),
        )
        for i in range(11)
    )
    return SimpleNamespace(epoch=3, rows=rows)


def test_usage_tree_fast_path_matches_openzeppelin():
    tree = usage_tree(_usage11_epoch())
    assert tree.root == CASES["usage11"]["root"]
    assert tree.dump() == CASES["usage11"]["dump"]


def test_usage_tree_equals_generic_build_of_usage_leaves():
    frozen = SimpleNamespace(
        epoch=7,
        rows=tuple(
            UsageRow(f"r{i}", f"n{i % 4}", ADDR[i % 3], f"m{i % 2}", i * 3, 2**70 + i) for i in range(50)
        ),
    )
    generic = StandardMerkleTree.of([usage_leaf(r, 7) for r in frozen.rows], USAGE_LEAF_ENCODING)
    assert usage_tree(frozen).root == generic.root


def test_prove_and_verify_a_request_from_a_dump():
    frozen = _usage11_epoch()
    loaded = StandardMerkleTree.load(json.loads(json.dumps(usage_tree(frozen).dump())))
    i = find_usage_leaf(loaded, "req-5")
    value = loaded.at(i)
    assert value == [x if isinstance(x, str) else str(x) for x in usage_leaf(frozen.rows[5], 3)]
    assert StandardMerkleTree.verify(loaded.root, USAGE_LEAF_ENCODING, value, loaded.get_proof(i))
    with pytest.raises(MerkleTreeError, match="not in this usage tree"):
        find_usage_leaf(loaded, "req-99")


def test_reward_leaf_is_the_on_chain_encoding():
    operator, amount = ADDR[4], 12345 * 10**18
    tree = reward_tree({operator: amount, ADDR[1]: 1})
    i = find_reward_leaf(tree, operator.lower())
    expected_leaf = keccak(keccak(abi_encode(["address", "uint256"], [operator, amount])))
    assert tree.leaf_hash(tree.at(i)) == expected_leaf
    assert StandardMerkleTree.verify(tree.root, REWARD_LEAF_ENCODING, [operator, amount], tree.get_proof(i))


def test_reward_tree_matches_openzeppelin_and_skips_zero():
    case = CASES["rewards7"]
    cumulative = {addr.lower(): int(amount) for addr, amount in case["values"]}
    cumulative["0x" + "99" * 20] = 0
    tree = reward_tree(cumulative)
    assert tree.root == case["root"]
    assert len(tree) == 7
    with pytest.raises(MerkleTreeError, match="no leaf"):
        find_reward_leaf(tree, "0x" + "99" * 20)
    with pytest.raises(MerkleTreeError, match="non-negative"):
        reward_tree({ADDR[0]: -1})


def test_empty_trees_have_zero_root():
    assert reward_root({}) == ZERO_ROOT
    assert reward_root({ADDR[0]: 0}) == ZERO_ROOT
    assert usage_root(SimpleNamespace(epoch=0, rows=())) == ZERO_ROOT
    with pytest.raises(EmptyTreeError):
        usage_tree(SimpleNamespace(epoch=0, rows=()))
    assert usage_root(_usage11_epoch()) == CASES["usage11"]["root"]
