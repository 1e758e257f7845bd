"""StandardMerkleTree against OpenZeppelin's own output (tests/fixtures/oz_merkle, made by its npm package)."""

import json
import os
from pathlib import Path

import pytest
from eth_abi import encode as abi_encode
from eth_hash.backends import pycryptodome
from eth_hash.main import Keccak256
from hypothesis import given, settings
from hypothesis import strategies as st

from settlement.merkle import (
    BULK_LEAVES,
    MerkleTreeError,
    StandardMerkleTree,
    keccak256,
    make_encoder,
    static_encoder,
)

VECTORS = json.loads((Path(__file__).parents[1] / "fixtures" / "oz_merkle" / "vectors.json").read_text())
CASES = {case["name"]: case for case in VECTORS["cases"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_of_matches_openzeppelin(name):
    case = CASES[name]
    tree = StandardMerkleTree.of(case["values"], case["leafEncoding"])
    assert tree.root == case["root"]
    assert tree.dump() == case["dump"]
    assert [tree.get_proof(i) for i in range(len(case["values"]))] == case["proofs"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_openzeppelin_dump_and_verify(name):
    case = CASES[name]
    tree = StandardMerkleTree.load(case["dump"])
    assert tree.root == case["root"]
    for value, proof in zip(case["values"], case["proofs"]):
        assert tree.get_proof(value) == proof or case["name"] == "duplicates"
        assert StandardMerkleTree.verify(case["root"], case["leafEncoding"], value, proof)


def test_verify_rejects_wrong_value_proof_and_root():
    case = CASES["rewards7"]
    value, proof, enc, root = case["values"][2], case["proofs"][2], case["leafEncoding"], case["root"]
    assert StandardMerkleTree.verify(root, enc, value, proof)
    assert not StandardMerkleTree.verify(root, enc, [value[0], str(int(value[1]) + 1)], proof)
    assert not StandardMerkleTree.verify(root, enc, value, proof[:-1])
    assert not StandardMerkleTree.verify(root, enc, value, case["proofs"][3])
    assert not StandardMerkleTree.verify("0x" + "00" * 32, enc, value, proof)
    assert not StandardMerkleTree.verify(root, enc, value[:1], proof)  # wrong arity is False, not a crash


def test_load_rejects_tampering():
    dump = json.loads(json.dumps(CASES["usage11"]["dump"]))
    dump["tree"][3] = "0x" + "11" * 32
    with pytest.raises(MerkleTreeError, match="invalid"):
        StandardMerkleTree.load(dump)
    dump = json.loads(json.dumps(CASES["usage11"]["dump"]))
    dump["values"][0]["value"][4] = "999"
    with pytest.raises(MerkleTreeError, match="expected value"):
        StandardMerkleTree.load(dump)
    with pytest.raises(MerkleTreeError, match="format"):
        StandardMerkleTree.load({**CASES["readme"]["dump"], "format": "simple-v1"})


def test_empty_and_unknown_value():
    with pytest.raises(MerkleTreeError, match="zero leaves"):
        StandardMerkleTree.of([], ["uint256"])
    tree = StandardMerkleTree.of(CASES["readme"]["values"], ["address", "uint256"])
    with pytest.raises(MerkleTreeError, match="not in the tree"):
        tree.get_proof(["0x1111111111111111111111111111111111111111", "1"])
    with pytest.raises(MerkleTreeError, match="out of range"):
        tree.get_proof(5)


def test_dump_round_trips_through_json_with_python_values():
    values = [[bytes([i]) * 32, i * 10**20, f"0x{i:040x}"] for i in range(1, 9)]
    tree = StandardMerkleTree.of(values, ["bytes32", "uint256", "address"])
    loaded = StandardMerkleTree.load(json.loads(json.dumps(tree.dump())))
    assert loaded.root == tree.root
    assert loaded.get_proof(3) == tree.get_proof(values[3])


def test_out_of_range_values_are_rejected():
    with pytest.raises(MerkleTreeError, match="uint8"):
        StandardMerkleTree.of([[256]], ["uint8"])
    with pytest.raises(MerkleTreeError, match="20 bytes"):
        StandardMerkleTree.of([["0x1234"]], ["address"])


def test_keccak_backend_agrees_with_pycryptodome():
    reference = Keccak256(pycryptodome)
    for n in (0, 1, 31, 32, 64, 135, 136, 137, 500):
        data = os.urandom(n)
        assert keccak256(data) == reference(data)


_static_values = st.tuples(
    st.binary(min_size=20, max_size=20),
    st.integers(0, 2**256 - 1),
    st.integers(-(2**255), 2**255 - 1),
    st.booleans(),
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=32, max_size=32),
)


@settings(max_examples=60, deadline=None)
@given(_static_values)
def test_fast_static_encoder_equals_eth_abi(v):
    types = ["address", "uint256", "int256", "bool", "bytes4", "bytes32"]
    value = ["0x" + v[0].hex(), *v[1:]]
    assert static_encoder(types)(value) == make_encoder(types)(value) == abi_encode(types, value)
    as_json = [value[0], str(v[1]), str(v[2]), v[3], "0x" + v[4].hex(), "0x" + v[5].hex()]
    assert static_encoder(types)(as_json) == make_encoder(types)(as_json) == abi_encode(types, value)


@pytest.mark.parametrize(
    ("abi_type", "bad"),
    [
        ("uint8", 256),
        ("uint256", -1),
        ("int8", 128),
        ("address", "0x1234"),
        ("bytes4", b"\x01\x02"),
        ("bytes32", "0x" + "00" * 31),
        ("bool", 1),
        ("uint256", True),
        ("uint256", 1.5),
    ],
)
def test_both_encoders_refuse_the_same_values(abi_type, bad):
    with pytest.raises(MerkleTreeError):
        make_encoder([abi_type])([bad])
    with pytest.raises(MerkleTreeError):
        static_encoder([abi_type])([bad])


def test_large_and_small_trees_agree_whichever_encoder_builds_them():
    values = [[f"0x{i:040x}", i] for i in range(1, BULK_LEAVES + 1)]
    big = StandardMerkleTree.of(values, ["address", "uint256"])  # bulk: the hand-written encoder
    one_by_one = StandardMerkleTree.of_encoded(
        values, [make_encoder(["address", "uint256"])(v) for v in values], ["address", "uint256"]
    )
    assert big.root == one_by_one.root
    big.validate()
    assert StandardMerkleTree.verify(big.root, ["address", "uint256"], values[7], big.get_proof(values[7]))
