"""The two per-epoch trees: usage (one leaf per ok interaction) and rewards (one leaf per paid
address: operators, and validators paid by their dividends).

Both are OpenZeppelin StandardMerkleTrees, so `@openzeppelin/merkle-tree` and `MerkleProof.verify`
accept their roots and proofs. The on-chain distributor checks a reward leaf as
`keccak256(concat(keccak256(abi_encode(operator, amount))))` - exactly REWARD_LEAF_ENCODING below.

Usage leaf fields (USAGE_LEAF_ENCODING, in order; epochs closed before version 2 have the first seven):
  bytes32 requestId   keccak256(utf-8 request_id): fixed size whatever the gateway's id format
  bytes32 node        keccak256(utf-8 node_id): node ids are names, not addresses; hashing keeps
                      the leaf all-static (cheap to encode, cheap to verify in a contract) and is
                      reproducible by anyone who knows the node id
  address operator    the address paid for the node's work
  bytes32 modelHash   keccak256(utf-8 model id the client asked for)
  uint256 promptTokens, uint256 completionTokens   as reported to the client
  uint256 epoch       the epoch the ledger froze the record into (may be later than its end time
                      suggests for late records; see settlement.ledger)
  bytes32 requestHash   sha256 of the request body's bytes exactly as the client sent them
  bytes32 responseHash  sha256 of the response body's bytes exactly as the client got them (a stream:
                        every byte of it, through `data: [DONE]`); zero for records from before

Reward leaf: (address operator, uint256 cumulative wei over all settled epochs so far); claims are
cumulative on-chain, so an account's latest leaf is all it ever needs. A validator is paid at the
address that signs its score reports, in a leaf of the same form (an address both operates nodes and
validates: one leaf with both amounts summed). Accounts with a
cumulative amount of 0 get no leaf.

An empty tree has no OZ root; use `usage_root` / `reward_root`, which give ZERO_ROOT for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from eth_utils import to_checksum_address

from settlement.merkle import MerkleTreeError, StandardMerkleTree, keccak256, keccak_many

__all__ = [
    "REWARD_LEAF_ENCODING",
    "USAGE_LEAF_ENCODING",
    "USAGE_LEAF_ENCODINGS",
    "USAGE_LEAF_VERSION",
    "ZERO_ROOT",
    "EmptyTreeError",
    "find_reward_leaf",
    "find_usage_leaf",
    "model_key",
    "node_key",
    "request_key",
    "reward_root",
    "reward_tree",
    "usage_leaf",
    "usage_root",
    "usage_tree",
]

# Leaf layouts by version: an epoch's tree is built with the version it was closed under (the ledger
# keeps it), so a root settled on-chain before leaves carried the body hashes still rebuilds and proves.
USAGE_LEAF_ENCODINGS: dict[int, list[str]] = {
    1: ["bytes32", "bytes32", "address", "bytes32", "uint256", "uint256", "uint256"],
    2: ["bytes32", "bytes32", "address", "bytes32", "uint256", "uint256", "uint256", "bytes32", "bytes32"],
}
USAGE_LEAF_VERSION = 2  # what an epoch closed now is built with
USAGE_LEAF_ENCODING: list[str] = USAGE_LEAF_ENCODINGS[USAGE_LEAF_VERSION]
REWARD_LEAF_ENCODING: list[str] = ["address", "uint256"]
ZERO_ROOT = "0x" + "00" * 32
"""Root posted for an epoch with no leaves (no ok usage, or no operator ever rewarded)."""


class EmptyTreeError(MerkleTreeError):
    """Raised when a tree would have no leaves; post ZERO_ROOT instead (usage_root/reward_root do)."""


class _UsageRowLike(Protocol):
    request_id: str
    node_id: str
    operator: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    request_hash: str
    response_hash: str


class _FrozenLike(Protocol):
    epoch: int

    @property
    def rows(self) -> Iterable[_UsageRowLike]: ...


def _k(text: str) -> bytes:
    return keccak256(text.encode("utf-8"))


def request_key(request_id: str) -> str:
    """The usage leaf's `requestId` field for a gateway request id (0x hex)."""
    return "0x" + _k(request_id).hex()


def node_key(node_id: str) -> str:
    """The usage leaf's `node` field for a node id (0x hex)."""
    return "0x" + _k(node_id).hex()


def model_key(model: str) -> str:
    """The usage leaf's `modelHash` field for a model id (0x hex)."""
    return "0x" + _k(model).hex()


def body_hash(sha256_hex: str) -> bytes:
    """A record's body hash as a bytes32 word (zero when the record has none)."""
    return bytes.fromhex(sha256_hex) if sha256_hex else bytes(32)


def usage_leaf(row: _UsageRowLike, epoch: int, version: int = USAGE_LEAF_VERSION) -> list[Any]:
    """The JSON-friendly usage leaf value of one record (what a dump shows and `verify` takes)."""
    leaf = [
        request_key(row.request_id),
        node_key(row.node_id),
        row.operator,
        model_key(row.model),
        row.prompt_tokens,
        row.completion_tokens,
        epoch,
    ]
    if version >= 2:
        leaf += ["0x" + body_hash(row.request_hash).hex(), "0x" + body_hash(row.response_hash).hex()]
    return leaf


def usage_tree(frozen_epoch: _FrozenLike) -> StandardMerkleTree:
    """The usage tree of a frozen epoch (its ok records), in the leaf layout it was closed under;
    EmptyTreeError when it has none."""
    epoch = frozen_epoch.epoch
    version = getattr(frozen_epoch, "leaf_version", USAGE_LEAF_VERSION)
    encoding = USAGE_LEAF_ENCODINGS[version]
    epoch_word = epoch.to_bytes(32, "big")
    node_cache: dict[str, bytes] = {}
    model_cache: dict[str, bytes] = {}
    operator_cache: dict[str, bytes] = {}
    values: list[list[Any]] = []
    encoded: list[bytes] = []
    k = _k
    rows = list(frozen_epoch.rows)
    request_keys = keccak_many([row.request_id.encode("utf-8") for row in rows])
    for row, rid in zip(rows, request_keys):
        node = node_cache.get(row.node_id)
        if node is None:
            node = node_cache[row.node_id] = k(row.node_id)
        model = model_cache.get(row.model)
        if model is None:
            model = model_cache[row.model] = k(row.model)
        operator = operator_cache.get(row.operator)
        if operator is None:
            operator = operator_cache[row.operator] = bytes(12) + bytes.fromhex(row.operator[2:])
        # bytes, not hex, in values: the dump renders hex, and nothing round-trips per leaf.
        value = [rid, node, row.operator, model, row.prompt_tokens, row.completion_tokens, epoch]
        # abi.encode of the leaf's static words, written out directly (a bulk fast path; tested
        # against the generic encoder and OZ's own vectors).
        words = [
            rid,
            node,
            operator,
            model,
            row.prompt_tokens.to_bytes(32, "big"),
            row.completion_tokens.to_bytes(32, "big"),
            epoch_word,
        ]
        if version >= 2:
            hashes = [body_hash(row.request_hash), body_hash(row.response_hash)]
            value += hashes
            words += hashes
        values.append(value)
        encoded.append(b"".join(words))
    if not values:
        raise EmptyTreeError(
            f"epoch {epoch} has no ok usage records, so no usage tree; its root is ZERO_ROOT"
        )
    return StandardMerkleTree.of_encoded(values, encoded, encoding)


def usage_root(frozen_epoch: _FrozenLike) -> str:
    """Usage root to post for the epoch: the tree's root, or ZERO_ROOT when it has no ok records."""
    try:
        return usage_tree(frozen_epoch).root
    except EmptyTreeError:
        return ZERO_ROOT


def reward_tree(cumulative: Mapping[str, int]) -> StandardMerkleTree:
    """Reward tree over cumulative wei per operator; zero amounts get no leaf."""
    values: list[list[Any]] = []
    for operator, amount in cumulative.items():
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise MerkleTreeError(
                f"cumulative reward of {operator} must be a non-negative int (wei), got {amount!r}"
            )
        if amount > 0:
            values.append([to_checksum_address(operator), amount])
    if not values:
        raise EmptyTreeError(
            "no operator has a positive cumulative reward, so no reward tree; root is ZERO_ROOT"
        )
    values.sort(key=lambda v: v[0].lower())  # deterministic value order in the dump
    return StandardMerkleTree.of(values, REWARD_LEAF_ENCODING)


def reward_root(cumulative: Mapping[str, int]) -> str:
    """Reward root to post: the tree's root, or ZERO_ROOT when nobody has earned anything yet."""
    try:
        return reward_tree(cumulative).root
    except EmptyTreeError:
        return ZERO_ROOT


def find_usage_leaf(tree: StandardMerkleTree, request_id: str) -> int:
    """Value index of a request id's leaf in a usage tree (for get_proof); MerkleTreeError if absent."""
    key = _k(request_id)
    hex_key = "0x" + key.hex()
    for i in range(len(tree)):
        first = tree.at(i)[0]
        if first == key or (isinstance(first, str) and first.lower() == hex_key):
            return i
    raise MerkleTreeError(f"request id {request_id!r} is not in this usage tree (not ok, or another epoch?)")


def find_reward_leaf(tree: StandardMerkleTree, operator: str) -> int:
    """Value index of an operator's leaf in a reward tree; MerkleTreeError if it has none."""
    wanted = operator.lower()
    for i in range(len(tree)):
        if str(tree.at(i)[0]).lower() == wanted:
            return i
    raise MerkleTreeError(f"operator {operator} has no leaf in this reward tree (nothing earned yet?)")
