"""Usage-weighted rewards of one epoch: pure, exact, deterministic.

    weight_i = (prompt_weight * prompt_tokens_i + completion_weight * completion_tokens_i) * quality_i
    reward_i = emission_wei * weight_i / sum_j weight_j

Exactness: quality arrives as a float in [0, 1]; it is converted with `fractions.Fraction(q)`, the
float's exact binary value (no rounding, same on every IEEE-754 machine), and all arithmetic is on
integers and Fractions. No float ever touches an amount.

Remainder rule (largest remainder, a.k.a. Hamilton): each node first gets floor(exact share); the
R wei left over (R < number of shares with a fractional part) go one each to the shares with the
largest fractional part, ties broken by (node_id, operator) ascending. So rewards sum exactly to the emission,
and a node's reward never decreases when its usage or quality grows (others fixed): a node that
held a remainder wei can only be overtaken by nodes whose floor dropped, and each such drop adds
one wei to R.

Operators: a node id may serve under two operators in one epoch (the registry allows unregister +
register). Each (node, operator) pair is then a share of its own: its weighted tokens x the node's
quality, paid to that operator. A node's entry in `usage` is one NodeUsage, or one per operator.

Eligibility: zero usage, zero quality, or no quality entry at all (unscored nodes are on probation)
means weight 0 and reward 0. When no node has positive weight the whole emission is returned as
`carried_wei`; the settler adds it to the next epoch's budget (the RewardBook keeps it per epoch).

Validators: of each epoch's budget the settler first sets aside `validator_pool` (a configured share,
in basis points, when some validator holds a positive dividend) and splits it with
`split_by_weight` by dividend; `compute_rewards` splits the rest between operators.
Only ok records count as usage: that filter is the ledger's (UsageLedger.usage_by_node).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, TypeVar

K = TypeVar("K", str, tuple[str, str])  # a share's key: validator address, or (node id, operator)

__all__ = [
    "BPS",
    "NodeShares",
    "NodeUsage",
    "RewardResult",
    "compute_rewards",
    "epoch_quality",
    "split_by_weight",
    "validator_pool",
    "weighted_usage",
]

BPS = 10_000  # basis points in a whole: the validator share is an integer count of them


class NodeUsage(NamedTuple):
    """One node's ok usage in an epoch and who gets paid for it."""

    operator: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class RewardResult:
    """An epoch's split: wei per node (every node in the usage), per operator (positive only), carried."""

    per_node: dict[str, int]
    per_operator: dict[str, int]
    carried_wei: int


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def weighted_usage(usage: NodeUsage, prompt_weight: int, completion_weight: int) -> int:
    """Weighted tokens of one node (integers, so weights are integers too: scale them if needed)."""
    return prompt_weight * usage.prompt_tokens + completion_weight * usage.completion_tokens


NodeShares = NodeUsage | Sequence[NodeUsage]  # a node's usage: one NodeUsage, or one per operator


def _shares(entry: NodeShares) -> Sequence[NodeUsage]:
    return (entry,) if isinstance(entry, NodeUsage) else entry


def epoch_quality(
    usage: Mapping[str, NodeShares], scores: Mapping[str, float] | None, default: float | None
) -> dict[str, float]:
    """The quality settlement uses for each node with usage: its consensus score for the epoch, or
    `default` for a node no consensus round scored in the epoch (not yet verified by a kappa-majority
    of stake: see `scoring.ConsensusState`). `default=None` means unscored nodes weigh 0."""
    return {node: (scores or {}).get(node, default or 0.0) for node in usage}


def compute_rewards(
    usage: Mapping[str, NodeShares],
    quality: Mapping[str, float],
    emission_wei: int,
    prompt_weight: int,
    completion_weight: int,
) -> RewardResult:
    """Split `emission_wei` over (node, operator) shares by weighted usage x the node's quality (see
    the module doc for the rules); per_node is each node's total over its operators."""
    _non_negative_int("emission_wei", emission_wei)
    _non_negative_int("prompt_weight", prompt_weight)
    _non_negative_int("completion_weight", completion_weight)

    weights: dict[tuple[str, str], Fraction] = {}
    for node_id, entry in usage.items():
        q = quality.get(node_id, 0.0)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0 <= q <= 1:
            raise ValueError(f"quality of {node_id} must be a finite number in [0, 1], got {q!r}")
        for u in _shares(entry):
            _non_negative_int(f"prompt_tokens of {node_id}", u.prompt_tokens)
            _non_negative_int(f"completion_tokens of {node_id}", u.completion_tokens)
            share = (node_id, u.operator)
            weights[share] = weights.get(share, Fraction(0)) + weighted_usage(
                u, prompt_weight, completion_weight
            ) * Fraction(q)

    total = sum(weights.values(), Fraction(0))
    per_node = dict.fromkeys(sorted(usage), 0)
    if total == 0 or emission_wei == 0:
        return RewardResult(per_node, {}, emission_wei if total == 0 else 0)

    per_share = _largest_remainder(emission_wei, weights, total)
    per_operator: dict[str, int] = {}
    for (node_id, operator), amount in per_share.items():
        per_node[node_id] += amount
        if amount:
            per_operator[operator] = per_operator.get(operator, 0) + amount
    return RewardResult(per_node, dict(sorted(per_operator.items())), 0)


def validator_pool(budget_wei: int, validator_share_bps: int, dividends: Mapping[str, float]) -> int:
    """The validators' part of an epoch's budget: floor(budget x share / 10,000) when some validator
    has a positive dividend, else 0 (nobody holds a bond, so the operators get the whole budget)."""
    _non_negative_int("budget_wei", budget_wei)
    if not 0 <= _non_negative_int("validator_share_bps", validator_share_bps) <= BPS:
        raise ValueError(f"validator_share_bps must be in [0, {BPS}], got {validator_share_bps}")
    if not any(d > 0 for d in dividends.values()):
        return 0
    return budget_wei * validator_share_bps // BPS


def split_by_weight(weights: Mapping[str, float], amount_wei: int) -> dict[str, int]:
    """Split `amount_wei` in proportion to `weights` (finite, >= 0): exact, with the same largest
    remainder rule as compute_rewards (ties by key ascending), so the parts sum to `amount_wei`
    exactly. Keys with a zero part are left out; all-zero weights give {}."""
    _non_negative_int("amount_wei", amount_wei)
    exact_weights: dict[str, Fraction] = {}
    for key, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {key} must be a finite number >= 0, got {w!r}")
        if w > 0:
            exact_weights[key] = Fraction(w)
    total = sum(exact_weights.values(), Fraction(0))
    if total == 0 or amount_wei == 0:
        return {}
    parts = _largest_remainder(amount_wei, exact_weights, total)
    return {k: v for k, v in parts.items() if v}


def _largest_remainder(amount_wei: int, weights: Mapping[K, Fraction], total: Fraction) -> dict[K, int]:
    """`amount_wei` split exactly in proportion to `weights` (summing to `total` > 0): each key gets the
    floor of its exact part, and the wei left over go one each to the largest fractional parts (ties:
    smaller key first), so the parts sum to `amount_wei`."""
    parts: dict[K, int] = {}
    fractional: list[tuple[Fraction, K]] = []
    for key in sorted(weights):
        exact = amount_wei * weights[key] / total
        whole = exact.numerator // exact.denominator
        parts[key] = whole
        if exact != whole:
            fractional.append((exact - whole, key))
    remainder = amount_wei - sum(parts.values())
    assert 0 <= remainder <= len(fractional), "largest-remainder invariant broken"
    fractional.sort(key=lambda item: (-item[0], item[1]))
    for _, key in fractional[:remainder]:
        parts[key] += 1
    return parts
