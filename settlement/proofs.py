"""An account's reward proof as a network serves it (`GET /v1/operators/{address}/proof`), and the
checks a claimant runs on one before it sends a claim.

The network builds the proof from its reward book: the cumulative reward tree of the last epoch it
settled on-chain, whose root is the one the distributor holds. The claimant trusts none of it: it
checks the contract and chain id against the chain it reaches itself, the leaf against its own
address, and the proof against the root read from the contract, so a wrong or stale proof is refused
before any gas is spent. The document has the same fields as `meritnet settlement prove --operator`
writes (tree, epoch, root, leafEncoding, value, proof), so `settlement verify` accepts it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eth_utils import is_address, to_checksum_address

from settlement.merkle import MerkleTreeError, StandardMerkleTree
from settlement.trees import REWARD_LEAF_ENCODING, EmptyTreeError, find_reward_leaf, reward_tree

if TYPE_CHECKING:
    from settlement.chain import Chain
    from settlement.ledger import UsageLedger
    from settlement.rewardbook import EpochCommitment, RewardBook

__all__ = ["ProofRejected", "check_reward_proof", "reward_proof", "settled_reward_proof", "usage_receipt"]


class ProofRejected(ValueError):
    """A served proof that must not be sent: the message says what did not match."""


def reward_proof(
    commitment: EpochCommitment,
    account: str,
    *,
    contract: str | None,
    chain_id: int,
    rpc_url: str | None = None,
) -> dict[str, Any]:
    """The account's cumulative reward leaf of `commitment` with its proof, or {"error": why}.

    Amounts are decimal strings (JSON numbers lose precision past 2**53). `rpc_url` is a public
    JSON-RPC URL the network names for claimants (never the settler's own, which may hold a key)."""
    base = {"operator": account, "epoch": commitment.epoch, "contract": contract, "chain_id": chain_id}
    try:
        tree = reward_tree(commitment.cumulative)
        index = find_reward_leaf(tree, account)
    except (EmptyTreeError, MerkleTreeError):
        return {
            **base,
            "error": f"{account} has no reward through epoch {commitment.epoch} (nothing earned yet)",
        }
    address, amount = tree.at(index)
    return {
        **base,
        "tree": "rewards",
        "root": tree.root,
        "leafEncoding": list(tree.leaf_encoding),
        "value": [address, str(amount)],
        "proof": tree.get_proof(index),
        "cumulative_wei": str(amount),
        "rpc_url": rpc_url,
    }


def settled_reward_proof(
    book: RewardBook,
    last_settled_epoch: int | None,
    account: str,
    *,
    contract: str | None,
    chain_id: int,
    rpc_url: str | None = None,
) -> dict[str, Any]:
    """`reward_proof` for the last epoch settled on-chain (a committed but unsent epoch's root is not
    on the contract yet, so its proof would not verify)."""
    if last_settled_epoch is None:
        return {"operator": account, "epoch": None, "error": "no epoch is settled on-chain yet"}
    commitment = book.get(last_settled_epoch)
    if commitment is None:
        return {
            "operator": account,
            "epoch": last_settled_epoch,
            "error": "the settled epoch is not in the book",
        }
    return reward_proof(commitment, account, contract=contract, chain_id=chain_id, rpc_url=rpc_url)


def check_reward_proof(doc: dict[str, Any], chain: Chain, account: str) -> tuple[int, list[bytes]]:
    """(cumulative wei, proof) from a served proof document, once it is shown to be `account`'s leaf
    under the reward root `chain`'s distributor lets claims verify against now (not one still pending in
    its veto window); ProofRejected otherwise."""
    try:
        address, amount = doc["value"]
        cumulative = int(amount)
        proof = [bytes.fromhex(str(p).removeprefix("0x")) for p in doc["proof"]]
        claimed_root = str(doc["root"])
    except (KeyError, TypeError, ValueError):
        raise ProofRejected("the network's answer is not a reward proof (value, proof and root)") from None
    if doc.get("tree", "rewards") != "rewards" or list(doc.get("leafEncoding", REWARD_LEAF_ENCODING)) != list(
        REWARD_LEAF_ENCODING
    ):
        raise ProofRejected(
            f"not a reward leaf: tree {doc.get('tree')!r}, encoding {doc.get('leafEncoding')!r}"
        )
    if not is_address(address) or to_checksum_address(address) != to_checksum_address(account):
        raise ProofRejected(f"the proof is for {address}, not for {account}")
    if doc.get("contract") and to_checksum_address(doc["contract"]) != chain.address:
        raise ProofRejected(f"the proof is for contract {doc['contract']}, not {chain.address}")
    if doc.get("chain_id") is not None and int(doc["chain_id"]) != chain.chain_id:
        raise ProofRejected(
            f"the proof is for chain {doc['chain_id']}, the RPC URL serves chain {chain.chain_id}"
        )
    onchain = "0x" + bytes(chain.reward_root()).hex()
    window = chain.root_window()
    if window.pending and claimed_root.lower() == "0x" + chain.latest_root().hex():
        raise ProofRejected(
            f"the proof's root (epoch {window.latest_epoch}) is pending until unix time {window.claimable_at} "
            "(the admin may veto it until then): claim again after that"
        )
    if claimed_root.lower() != onchain:
        raise ProofRejected(
            f"the proof's root {claimed_root} (epoch {doc.get('epoch')}) is not the root on-chain {onchain}: "
            "the network served a stale or wrong proof; retry after the next settle"
        )
    if not StandardMerkleTree.verify(onchain, REWARD_LEAF_ENCODING, [address, cumulative], doc["proof"]):
        raise ProofRejected(f"the proof does not verify against the on-chain root {onchain}")
    return cumulative, proof


def usage_receipt(
    ledger: UsageLedger, request_id: str, *, contract: str | None, chain_id: int, trees: dict[int, Any]
) -> dict[str, Any]:
    """GET /v1/receipts/{request_id}: the request's usage leaf with its proof under the usage root its
    epoch's settle put on-chain, or where it stands ("pending" until its epoch settles; {"error": why}
    for an id the ledger never took or a request that was not billed). Built from the frozen epoch, so
    a receipt never changes once given; `trees` caches usage trees by epoch (the caller bounds it)."""
    from settlement.trees import find_usage_leaf, usage_tree

    found = ledger.find(request_id)
    if found is None:
        return {"request_id": request_id, "error": f"no usage record of request {request_id}"}
    epoch, record = found
    if record.status != "ok":
        return {
            "request_id": request_id,
            "error": f"request {request_id} ended {record.status!r}: not billed",
        }
    tx = ledger.settled(epoch)
    if tx is None:
        _, ends = ledger.epoch_bounds(epoch)
        return {"request_id": request_id, "status": "pending", "epoch": epoch, "epoch_ends_at": ends}
    tree = trees.get(epoch)
    if tree is None:
        tree = trees[epoch] = usage_tree(ledger.frozen_epoch(epoch))
    index = find_usage_leaf(tree, request_id)
    return {
        "request_id": request_id,
        "status": "settled",
        "epoch": epoch,
        "tx": tx,
        "tree": "usage",
        "root": tree.root,
        "leafEncoding": list(tree.leaf_encoding),
        "value": tree.dump()["values"][index]["value"],
        "proof": tree.get_proof(index),
        "billed": {
            "model": record.model,
            "node_id": record.node_id,
            "operator": record.operator,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "request_hash": record.request_hash,
            "response_hash": record.response_hash,
        },
        "contract": contract,
        "chain_id": chain_id,
    }
