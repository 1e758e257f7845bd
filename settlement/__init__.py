"""settlement: usage ledger and epochs, rewards, Merkle trees (off-chain half), contract and chain (on-chain half).

Imports here stay light (no web3): the gateway's metering only needs the ledger.
"""

from settlement.ledger import UsageLedger
from settlement.ledger_values import AppendResult, FrozenEpoch, LedgerError, PendingTx, UsageRow
from settlement.merkle import MerkleTreeError, StandardMerkleTree, keccak256
from settlement.rewards import NodeUsage, RewardResult, compute_rewards, weighted_usage
from settlement.trees import (
    REWARD_LEAF_ENCODING,
    USAGE_LEAF_ENCODING,
    ZERO_ROOT,
    EmptyTreeError,
    find_reward_leaf,
    find_usage_leaf,
    model_key,
    node_key,
    request_key,
    reward_root,
    reward_tree,
    usage_leaf,
    usage_root,
    usage_tree,
)

__all__ = [
    "REWARD_LEAF_ENCODING",
    "USAGE_LEAF_ENCODING",
    "ZERO_ROOT",
    "AppendResult",
    "EmptyTreeError",
    "FrozenEpoch",
    "LedgerError",
    "MerkleTreeError",
    "NodeUsage",
    "PendingTx",
    "RewardResult",
    "StandardMerkleTree",
    "UsageLedger",
    "UsageRow",
    "compute_rewards",
    "find_reward_leaf",
    "find_usage_leaf",
    "keccak256",
    "model_key",
    "node_key",
    "request_key",
    "reward_root",
    "reward_tree",
    "usage_leaf",
    "usage_root",
    "usage_tree",
    "weighted_usage",
]
