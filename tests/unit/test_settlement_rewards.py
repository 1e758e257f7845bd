"""compute_rewards: exact sums, the remainder rule, carry, and monotonicity (property tests)."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from settlement.rewards import NodeUsage, compute_rewards

A = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
B = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"


def test_proportional_split_and_per_operator_sum():
    usage = {"n1": NodeUsage(A, 100, 0), "n2": NodeUsage(A, 0, 100), "n3": NodeUsage(B, 100, 100)}
    # weights: n1 = 100*1*1.0, n2 = 100*3*0.5, n3 = (100 + 300)*1.0  -> 100 : 150 : 400
    r = compute_rewards(usage, {"n1": 1.0, "n2": 0.5, "n3": 1.0}, 650, 1, 3)
    assert r.per_node == {"n1": 100, "n2": 150, "n3": 400}
    assert r.per_operator == {A: 250, B: 400}
    assert r.carried_wei == 0


def test_remainder_goes_to_largest_fraction_then_lowest_node_id():
    usage = {n: NodeUsage(A, 1, 0) for n in ("c", "a", "b")}
    r = compute_rewards(usage, {"a": 1.0, "b": 1.0, "c": 1.0}, 11, 1, 1)
    assert r.per_node == {"a": 4, "b": 4, "c": 3}  # 11/3 each: equal fractions, ties by node_id
    usage = {"x": NodeUsage(A, 2, 0), "y": NodeUsage(B, 1, 0)}
    r = compute_rewards(usage, {"x": 1.0, "y": 1.0}, 10, 1, 1)
    assert r.per_node == {"x": 7, "y": 3}  # 6.67 -> 7 (largest fraction), 3.33 -> 3


def test_zero_quality_zero_usage_and_unscored_get_nothing():
    usage = {
        "q0": NodeUsage(A, 50, 50),
        "u0": NodeUsage(A, 0, 0),
        "unscored": NodeUsage(B, 9, 9),
        "ok": NodeUsage(B, 1, 0),
    }
    r = compute_rewards(usage, {"q0": 0.0, "u0": 1.0, "ok": 0.25}, 10**18 + 1, 1, 1)
    assert r.per_node == {"ok": 10**18 + 1, "q0": 0, "u0": 0, "unscored": 0}
    assert r.per_operator == {B: 10**18 + 1}


def test_no_eligible_usage_carries_the_emission():
    r = compute_rewards({"n": NodeUsage(A, 10, 10)}, {"n": 0.0}, 777, 1, 1)
    assert r == type(r)({"n": 0}, {}, 777)
    assert compute_rewards({}, {}, 5, 1, 1).carried_wei == 5


def test_quality_is_exact_not_float_rounded():
    # 0.1 is not 1/10 in binary; the exact rational keeps both nodes' shares consistent everywhere
    usage = {"a": NodeUsage(A, 1, 0), "b": NodeUsage(B, 1, 0)}
    r1 = compute_rewards(usage, {"a": 0.1, "b": 0.2}, 3 * 10**30, 1, 1)
    assert sum(r1.per_node.values()) == 3 * 10**30
    assert r1 == compute_rewards(dict(reversed(usage.items())), {"b": 0.2, "a": 0.1}, 3 * 10**30, 1, 1)


@pytest.mark.parametrize("quality", [-0.1, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_quality_is_rejected(quality):
    with pytest.raises(ValueError, match="quality"):
        compute_rewards({"n": NodeUsage(A, 1, 1)}, {"n": quality}, 10, 1, 1)


def test_bad_amounts_are_rejected():
    with pytest.raises(ValueError, match="emission_wei"):
        compute_rewards({}, {}, -1, 1, 1)
    with pytest.raises(ValueError, match="prompt_tokens"):
        compute_rewards({"n": NodeUsage(A, -1, 1)}, {"n": 1.0}, 10, 1, 1)


_node_ids = st.sampled_from([f"n{i}" for i in range(8)])
_usage = st.dictionaries(
    _node_ids, st.tuples(st.sampled_from([A, B]), st.integers(0, 10**6), st.integers(0, 10**6)), max_size=8
).map(lambda d: {k: NodeUsage(*v) for k, v in d.items()})
_quality = st.floats(0.0, 1.0, allow_nan=False)
_emission = st.integers(0, 10**27)


@settings(max_examples=200, deadline=None)
@given(_usage, st.data(), _emission, st.integers(0, 5), st.integers(0, 5))
def test_rewards_sum_exactly_to_emission(usage, data, emission, pw, cw):
    quality = {n: data.draw(_quality) for n in usage}
    r = compute_rewards(usage, quality, emission, pw, cw)
    assert sum(r.per_node.values()) + r.carried_wei == emission
    assert sum(r.per_operator.values()) == sum(r.per_node.values())
    assert all(v >= 0 for v in r.per_node.values())
    assert r.carried_wei in (0, emission)


@settings(max_examples=200, deadline=None)
@given(_usage, st.data(), _emission, st.integers(1, 10**5))
def test_monotone_in_usage(usage, data, emission, extra):
    assume(usage)
    quality = {n: data.draw(_quality) for n in usage}
    node = data.draw(st.sampled_from(sorted(usage)))
    more = dict(usage)
    more[node] = usage[node]._replace(completion_tokens=usage[node].completion_tokens + extra)
    before = compute_rewards(usage, quality, emission, 1, 2).per_node[node]
    after = compute_rewards(more, quality, emission, 1, 2).per_node[node]
    assert after >= before


@settings(max_examples=200, deadline=None)
@given(_usage, st.data(), _emission)
def test_monotone_in_quality(usage, data, emission):
    assume(usage)
    quality = {n: data.draw(_quality) for n in usage}
    node = data.draw(st.sampled_from(sorted(usage)))
    higher = dict(quality)
    higher[node] = data.draw(st.floats(quality[node], 1.0))
    before = compute_rewards(usage, quality, emission, 1, 1).per_node[node]
    after = compute_rewards(usage, higher, emission, 1, 1).per_node[node]
    assert after >= before


def test_a_node_under_two_operators_pays_each_its_own_share():
    # n1 served 300 weighted tokens for A and 100 for B (unregister + register); n2 200 for B.
    usage = {"n1": (NodeUsage(A, 300, 0), NodeUsage(B, 100, 0)), "n2": NodeUsage(B, 200, 0)}
    r = compute_rewards(usage, {"n1": 0.5, "n2": 1.0}, 1000, 1, 1)
    # weights: (n1, A) 150, (n1, B) 50, (n2, B) 200 of 400
    assert r.per_node == {"n1": 500, "n2": 500}
    assert r.per_operator == {A: 375, B: 625}
    # remainder wei go by share: 10 wei over three equal shares -> 4, 3, 3 by (node, operator)
    even = {"n1": (NodeUsage(A, 1, 0), NodeUsage(B, 1, 0)), "n2": NodeUsage(B, 1, 0)}
    r = compute_rewards(even, {"n1": 1.0, "n2": 1.0}, 10, 1, 1)
    assert r.per_operator == {A: 4, B: 6} and r.per_node == {"n1": 7, "n2": 3}
