"""OpenZeppelin StandardMerkleTree, byte-for-byte compatible with `@openzeppelin/merkle-tree`.

Why a port and not a call-out to npm: the settlement actor builds a tree per epoch (up to a
million usage leaves) and must not depend on node at run time. Compatibility is what matters
(standard tools and `MerkleProof.verify` on-chain must accept our roots and proofs), so the layout
is OZ's exactly; tests compare against dumps produced by the npm package itself.

- leaf  = keccak256(keccak256(abi.encode(values...)))   (double hash: no second-preimage via a node)
- node  = keccak256(min(a, b) ++ max(a, b))             (sorted pairs: proofs carry no left/right bits)
- layout: leaf hashes sorted ascending, stored in reverse at the end of a heap array `tree` of
  2n-1 nodes; node i has children 2i+1 and 2i+2; `tree[0]` is the root.

Speed: every hash here is one keccak-f call on a single block, so the per-call overhead dominates.
We hash through eth_hash's pysha3 backend (`safe-pysha3`, ~1 us/hash) when it is installed and
fall back to its pycryptodome backend (~3-7 us/hash) otherwise; results are identical.

Leaf encoding: `make_encoder` is eth_abi's `encode` (after strict checks of the JSON-style values:
exact widths, ranges, real bools), used wherever one leaf at a time is encoded (proof by value,
`verify`, small trees such as the reward tree). eth_abi costs ~30 us per leaf, so the two bulk paths
over up to a million usage leaves keep a hand-written encoder for all-static leaves
(`static_encoder`: address, bool, uintN, intN, bytesN): building a tree of many values (`of`) and
re-checking every leaf of a loaded dump (`validate`). Tests compare the two on random values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from eth_abi import encode as abi_encode

__all__ = [
    "KECCAK_BACKEND",
    "MerkleTreeError",
    "StandardMerkleTree",
    "keccak256",
    "keccak_many",
    "make_encoder",
    "static_encoder",
]

BULK_LEAVES = 256
"""From this many values up, `of` encodes with the hand-written static encoder (when it applies)."""


KECCAK_BACKEND = "safe-pysha3"
"""Which keccak implementation the trees use (benchmarks report it)."""


def _select_keccak() -> tuple[
    Callable[[bytes], bytes],
    Callable[[list[bytes]], list[bytes]],
    Callable[[list[bytes]], list[bytes]],
    Callable[[list[bytes], int], None],
]:
    """(keccak256, many, bulk leaf hasher, internal-node filler) via the fastest eth_hash backend."""
    try:
        from sha3 import keccak_256  # safe-pysha3: what eth_hash's "pysha3" backend wraps

        def one(data: bytes) -> bytes:
            return keccak_256(data).digest()

        def many(items: list[bytes]) -> list[bytes]:
            return [keccak_256(e).digest() for e in items]

        def leaves(encoded: list[bytes]) -> list[bytes]:
            # Inlined: a Python call per hash would cost as much as the hash itself.
            return [keccak_256(keccak_256(e).digest()).digest() for e in encoded]

        def fill(tree: list[bytes], first_leaf: int) -> None:
            for i in range(first_leaf - 1, -1, -1):
                a, b = tree[2 * i + 1], tree[2 * i + 2]
                tree[i] = keccak_256(a + b if a < b else b + a).digest()

        return one, many, leaves, fill
    except ImportError:
        global KECCAK_BACKEND
        KECCAK_BACKEND = "eth_hash.auto (pycryptodome)"
        from eth_hash.auto import keccak

        def fill_slow(tree: list[bytes], first_leaf: int) -> None:
            for i in range(first_leaf - 1, -1, -1):
                a, b = tree[2 * i + 1], tree[2 * i + 2]
                tree[i] = keccak(a + b if a < b else b + a)

        return (
            keccak,
            lambda items: [keccak(e) for e in items],
            lambda encoded: [keccak(keccak(e)) for e in encoded],
            fill_slow,
        )


keccak256, keccak_many, _leaf_hashes, _fill_internal = _select_keccak()
"""keccak256(data) -> 32 bytes; keccak_many(list of data) -> list of hashes, without per-item calls."""


class MerkleTreeError(ValueError):
    """A value, proof or dump that does not fit the tree; the message says what to fix."""


# ---------------------------------------------------------------- leaf encoding

_UINT = re.compile(r"^uint(\d*)$")
_INT = re.compile(r"^int(\d*)$")
_BYTES_N = re.compile(r"^bytes(\d+)$")
_ZERO12 = bytes(12)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise MerkleTreeError(f"expected an integer, got bool {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value, 0) if value.lower().startswith(("0x", "-0x")) else int(value, 10)
    raise MerkleTreeError(f"expected an integer (int or decimal/0x string), got {value!r}")


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.startswith("0x"):
        return bytes.fromhex(value[2:])
    raise MerkleTreeError(f"expected bytes or a 0x-prefixed hex string, got {value!r}")


def _static_encoder(abi_type: str) -> Callable[[Any], bytes] | None:
    """A fast encoder for one static ABI type, or None when eth_abi must do it."""
    if abi_type == "address":
        return _address_encoder()
    if abi_type == "bool":
        return _encode_bool
    if m := _UINT.match(abi_type):
        return _uint_encoder(int(m.group(1) or 256))
    if m := _INT.match(abi_type):
        return _int_encoder(int(m.group(1) or 256))
    if (m := _BYTES_N.match(abi_type)) and 1 <= int(m.group(1)) <= 32:
        return _bytes_n_encoder(int(m.group(1)))
    return None


def _address_encoder() -> Callable[[Any], bytes]:
    cache: dict[Any, bytes] = {}  # operators repeat across leaves; decode each once

    def enc_address(v: Any) -> bytes:
        word = cache.get(v) if isinstance(v, str) else None
        if word is None:
            raw = _to_bytes(v)
            if len(raw) != 20:
                raise MerkleTreeError(f"address must be 20 bytes, got {v!r}")
            word = _ZERO12 + raw
            if isinstance(v, str) and len(cache) < 65536:
                cache[v] = word
        return word

    return enc_address


def _encode_bool(v: Any) -> bytes:
    if not isinstance(v, bool):
        raise MerkleTreeError(f"bool leaf value must be True/False, got {v!r}")
    return (1 if v else 0).to_bytes(32, "big")


def _uint_encoder(bits: int) -> Callable[[Any], bytes]:
    top = 1 << bits

    def enc_uint(v: Any) -> bytes:
        if type(v) is int and 0 <= v < top:  # the common case, kept cheap
            return v.to_bytes(32, "big")
        n = _to_int(v)
        if n < 0 or n.bit_length() > bits:
            raise MerkleTreeError(f"{n} does not fit in uint{bits}")
        return n.to_bytes(32, "big")

    return enc_uint


def _int_encoder(bits: int) -> Callable[[Any], bytes]:
    def enc_int(v: Any) -> bytes:
        n = _to_int(v)
        if not -(1 << (bits - 1)) <= n < (1 << (bits - 1)):
            raise MerkleTreeError(f"{n} does not fit in int{bits}")
        return n.to_bytes(32, "big", signed=True)

    return enc_int


def _bytes_n_encoder(size: int) -> Callable[[Any], bytes]:
    def enc_bytes_n(v: Any) -> bytes:
        if type(v) is bytes and len(v) == 32 == size:
            return v
        raw = _to_bytes(v)
        if len(raw) != size:
            raise MerkleTreeError(f"bytes{size} value must be {size} bytes, got {len(raw)}")
        return raw.ljust(32, b"\0")

    return enc_bytes_n


def _normalise_for_eth_abi(abi_type: str, value: Any) -> Any:
    """Turn JSON-style values (decimal strings, 0x hex) into what eth_abi expects, as strictly as
    ethers (OZ's encoder) takes them: exact bytesN and address widths, integers in range, real bools."""
    if abi_type.endswith("]"):
        inner = abi_type[: abi_type.rindex("[")]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise MerkleTreeError(f"{abi_type} value must be a list, got {value!r}")
        return [_normalise_for_eth_abi(inner, v) for v in value]
    if m := _UINT.match(abi_type):
        bits, n = int(m.group(1) or 256), _to_int(value)
        if n < 0 or n.bit_length() > bits:
            raise MerkleTreeError(f"{n} does not fit in uint{bits}")
        return n
    if m := _INT.match(abi_type):
        bits, n = int(m.group(1) or 256), _to_int(value)
        if not -(1 << (bits - 1)) <= n < (1 << (bits - 1)):
            raise MerkleTreeError(f"{n} does not fit in int{bits}")
        return n
    if abi_type == "address":
        raw = _to_bytes(value)
        if len(raw) != 20:
            raise MerkleTreeError(f"address must be 20 bytes, got {value!r}")
        return raw
    if m := _BYTES_N.match(abi_type):
        raw, size = _to_bytes(value), int(m.group(1))
        if len(raw) != size:
            raise MerkleTreeError(f"bytes{size} value must be {size} bytes, got {len(raw)}")
        return raw
    if abi_type == "bytes":
        return _to_bytes(value)
    if abi_type == "bool" and not isinstance(value, bool):
        raise MerkleTreeError(f"bool leaf value must be True/False, got {value!r}")
    if abi_type == "string" and not isinstance(value, str):
        raise MerkleTreeError(f"string leaf value must be a str, got {value!r}")
    return value


def _check_encoding(leaf_encoding: Sequence[str]) -> list[str]:
    types = list(leaf_encoding)
    if not types:
        raise MerkleTreeError("leaf_encoding must name at least one ABI type, e.g. ['address', 'uint256']")
    return types


def make_encoder(leaf_encoding: Sequence[str]) -> Callable[[Sequence[Any]], bytes]:
    """abi.encode(values...) for this leaf encoding, through eth_abi (the generic encoder)."""
    types = _check_encoding(leaf_encoding)
    width = len(types)

    def encode(value: Sequence[Any]) -> bytes:
        if len(value) != width:
            raise MerkleTreeError(f"leaf {value!r} has {len(value)} fields; encoding {types} has {width}")
        normalised = [_normalise_for_eth_abi(t, v) for t, v in zip(types, value)]
        try:
            return abi_encode(types, normalised)
        except Exception as exc:  # eth_abi raises several unrelated types
            raise MerkleTreeError(f"cannot abi-encode {value!r} as {types}: {exc}") from exc

    return encode


def static_encoder(leaf_encoding: Sequence[str]) -> Callable[[Sequence[Any]], bytes] | None:
    """The hand-written abi.encode for an all-static leaf encoding (~10x faster than eth_abi, same
    bytes, same refusals); None when a type is dynamic. Only for the bulk paths (module doc)."""
    types = _check_encoding(leaf_encoding)
    encoders = [_static_encoder(t) for t in types]
    if not all(encoders):
        return None
    width = len(types)

    def encode_static(value: Sequence[Any]) -> bytes:
        if len(value) != width:
            raise MerkleTreeError(f"leaf {value!r} has {len(value)} fields; encoding {types} has {width}")
        return b"".join([enc(v) for enc, v in zip(encoders, value)])  # type: ignore[misc]

    return encode_static


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak256(a + b if a < b else b + a)


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _json_value(v: Any) -> Any:
    """Dump values the way OZ users write them in JSON: big ints as decimal strings, bytes as hex."""
    t = type(v)
    if t is str:
        return v
    if t is int:
        return str(v)
    if t is bytes:
        return "0x" + v.hex()
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return _hex(bytes(v))
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


# ---------------------------------------------------------------- the tree


class StandardMerkleTree:
    """A built tree: `root`, proofs by value index or by value, and OZ's `standard-v1` dump."""

    def __init__(
        self,
        tree: list[bytes],
        values: list[Sequence[Any]],
        tree_index: list[int],
        leaf_encoding: Sequence[str],
    ) -> None:
        self._tree = tree
        self._values = values
        self._tree_index = tree_index
        self.leaf_encoding = list(leaf_encoding)
        self._encode = make_encoder(self.leaf_encoding)
        self._bulk_encode = static_encoder(self.leaf_encoding) or self._encode
        self._lookup: dict[bytes, int] | None = None

    # -- building

    @classmethod
    def of(cls, values: Sequence[Sequence[Any]], leaf_encoding: Sequence[str]) -> StandardMerkleTree:
        """Build the tree exactly as OZ's `StandardMerkleTree.of(values, leafEncoding)` does."""
        encode = (len(values) >= BULK_LEAVES and static_encoder(leaf_encoding)) or make_encoder(leaf_encoding)
        return cls.of_encoded(values, [encode(v) for v in values], leaf_encoding)

    @classmethod
    def of_encoded(
        cls, values: Sequence[Sequence[Any]], encoded: list[bytes], leaf_encoding: Sequence[str]
    ) -> StandardMerkleTree:
        """`of` for callers that already hold abi.encode(value) for each value (a bulk fast path).

        The caller guarantees encoded[i] == abi.encode(leaf_encoding, values[i]); `validate()`
        checks it, and settlement.trees' tests compare against `of`.
        """
        n = len(values)
        if n == 0:
            raise MerkleTreeError("cannot build a Merkle tree of zero leaves (OZ rejects it too)")
        if len(encoded) != n:
            raise MerkleTreeError(f"{len(encoded)} encoded leaves for {n} values")
        leaves = _leaf_hashes(encoded)
        # Stable sort by hash, ties by original order (what JS's stable Array.sort gives OZ).
        order = sorted(range(n), key=leaves.__getitem__)
        size = 2 * n - 1
        tree: list[bytes] = [b""] * (size - n)
        tree.extend(leaves[value_index] for value_index in reversed(order))
        tree_index = [0] * n
        for leaf_pos, value_index in enumerate(order):
            tree_index[value_index] = size - 1 - leaf_pos
        _fill_internal(tree, size - n)  # node i = hash of sorted (2i+1, 2i+2), bottom up
        return cls(tree, list(values), tree_index, leaf_encoding)

    @classmethod
    def load(cls, dump: dict[str, Any]) -> StandardMerkleTree:
        """Load and fully validate a `standard-v1` dump (ours or OZ's)."""
        if dump.get("format") != "standard-v1":
            raise MerkleTreeError(
                f"unknown Merkle dump format {dump.get('format')!r}; expected 'standard-v1'"
            )
        if "leafEncoding" not in dump:
            raise MerkleTreeError("Merkle dump has no 'leafEncoding'")
        try:
            tree = [bytes.fromhex(h[2:]) for h in dump["tree"]]
            values = [entry["value"] for entry in dump["values"]]
            tree_index = [int(entry["treeIndex"]) for entry in dump["values"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise MerkleTreeError(f"malformed Merkle dump: {exc}") from exc
        loaded = cls(tree, values, tree_index, dump["leafEncoding"])
        loaded.validate()
        return loaded

    def validate(self) -> None:
        """Check every node hash and every value's leaf; raise MerkleTreeError on any mismatch."""
        tree = self._tree
        if not tree or any(len(node) != 32 for node in tree):
            raise MerkleTreeError("Merkle tree is invalid: nodes must be 32-byte hashes, at least one")
        for i in range(len(tree)):
            left, right = 2 * i + 1, 2 * i + 2
            if right < len(tree):
                if tree[i] != _hash_pair(tree[left], tree[right]):
                    raise MerkleTreeError(f"Merkle tree is invalid: node {i} is not the hash of its children")
            elif left < len(tree):
                raise MerkleTreeError("Merkle tree is invalid: a node has only one child")
        encode = self._bulk_encode  # every leaf of a possibly huge dump: the hand-written path
        for value_index, ti in enumerate(self._tree_index):
            if not 0 <= ti < len(tree) or tree[ti] != keccak256(keccak256(encode(self._values[value_index]))):
                raise MerkleTreeError(
                    f"Merkle tree does not contain the expected value at index {value_index}"
                )

    # -- reading

    @property
    def root(self) -> str:
        return _hex(self._tree[0])

    def __len__(self) -> int:
        return len(self._values)

    def at(self, index: int) -> Sequence[Any]:
        return self._values[index]

    def leaf_hash(self, value: Sequence[Any]) -> bytes:
        return keccak256(keccak256(self._encode(value)))

    def _check_value(self, value_index: int) -> int:
        if not 0 <= value_index < len(self._values):
            raise MerkleTreeError(
                f"value index {value_index} out of range (tree has {len(self._values)} values)"
            )
        ti = self._tree_index[value_index]
        if not 0 <= ti < len(self._tree) or self._tree[ti] != self.leaf_hash(self._values[value_index]):
            raise MerkleTreeError(f"Merkle tree does not contain the expected value at index {value_index}")
        return ti

    def index_of(self, value: Sequence[Any]) -> int:
        """Value index of a leaf value (OZ's leafLookup); MerkleTreeError when absent."""
        if self._lookup is None:
            self._lookup = {self._tree[ti]: vi for vi, ti in enumerate(self._tree_index)}
        found = self._lookup.get(self.leaf_hash(value))
        if found is None:
            raise MerkleTreeError(f"leaf {value!r} is not in the tree")
        return found

    def get_proof(self, index_or_value: int | Sequence[Any]) -> list[str]:
        """Sibling hashes from the leaf up to (not including) the root, as 0x hex."""
        value_index = index_or_value if isinstance(index_or_value, int) else self.index_of(index_or_value)
        i = self._check_value(value_index)
        proof = []
        while i > 0:
            proof.append(_hex(self._tree[i + 1 if i % 2 else i - 1]))
            i = (i - 1) // 2
        return proof

    def dump(self) -> dict[str, Any]:
        """OZ's `standard-v1` dump: loadable by `StandardMerkleTree.load` here and in JS."""
        return {
            "format": "standard-v1",
            "leafEncoding": list(self.leaf_encoding),
            "tree": [_hex(node) for node in self._tree],
            "values": [
                {"value": [_json_value(x) for x in v], "treeIndex": ti}
                for v, ti in zip(self._values, self._tree_index)
            ],
        }

    @staticmethod
    def verify(root: str, leaf_encoding: Sequence[str], value: Sequence[Any], proof: Sequence[str]) -> bool:
        """True when `value` with `proof` hashes up to `root` (no tree needed)."""
        try:
            node = keccak256(keccak256(make_encoder(leaf_encoding)(value)))
            for sibling in proof:
                node = _hash_pair(node, _to_bytes(sibling))
            return node == _to_bytes(root)
        except (MerkleTreeError, ValueError):
            return False
