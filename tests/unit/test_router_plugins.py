"""Table-driven tests of every built-in filter, scorer and picker, one plugin at a time (no cluster)."""

from __future__ import annotations

import math
import random

import pytest

from routing.router import REGISTRY, NodeSnapshot, PickContext, RequestFacts

NOW = 1000.0
FACTS = RequestFacts("m", 100, "prefix-a")


def node(i: str, **kw) -> NodeSnapshot:
    kw.setdefault("model_id", "m")
    kw.setdefault("capacity", 8)
    return NodeSnapshot(node_id=i, **kw)


def plugin(type_name: str, **params):
    cls = REGISTRY[type_name]
    return cls(type_name, cls.Params.model_validate(params))


def ctx(seed: int = 0, now: float = NOW) -> PickContext:
    return PickContext(now, random.Random(seed))


# ---- filters ---------------------------------------------------------------------------------
FILTER_CASES = [
    # (type, params, facts, nodes, expected kept ids)
    ("serves-model", {}, FACTS, [node("a"), node("b", model_id="other")], ["a"]),
    ("live", {}, FACTS, [node("a", live=False), node("b")], ["b"]),
    (
        "not-banned",
        {},
        FACTS,
        [node("a", banned_until=NOW + 1, last_failure_at=NOW), node("b", banned_until=NOW)],
        ["b"],
    ),
    # every node banned: the one that failed least recently stays eligible
    (
        "not-banned",
        {},
        FACTS,
        [
            node("a", banned_until=NOW + 5, last_failure_at=NOW - 1),
            node("b", banned_until=NOW + 9, last_failure_at=NOW - 3),
        ],
        ["b"],
    ),
    ("under-saturation", {"max_load": 1.0}, FACTS, [node("a", in_flight=8), node("b", in_flight=7)], ["b"]),
    ("under-saturation", {"max_load": 1.0}, FACTS, [node("a", in_flight=2, queue_depth=6), node("b")], ["b"]),
    (
        "under-saturation",
        {"max_load": 1.0},
        FACTS,
        [node("a", in_flight=9), node("b", in_flight=8)],
        ["a", "b"],
    ),
    (
        "under-saturation",
        {"max_load": 1.0, "keep_all_when_saturated": False},
        FACTS,
        [node("a", in_flight=9), node("b", in_flight=8)],
        [],
    ),
    # capacity-normalised: 20 of 32 is fine, 8 of 8 is full
    (
        "under-saturation",
        {"max_load": 1.0},
        FACTS,
        [node("a", capacity=32, in_flight=20), node("b", in_flight=8)],
        ["a"],
    ),
    (
        "quality-floor",
        {"floor": 0.5},
        FACTS,
        [node("a", quality=0.49), node("b", quality=0.5), node("c")],
        ["b", "c"],
    ),
    ("probation", {"share": 0.0}, FACTS, [node("a", quality=0.9), node("b")], ["a"]),
    ("probation", {"share": 1.0}, FACTS, [node("a", quality=0.9), node("b")], ["b"]),
    ("probation", {"share": 0.0}, FACTS, [node("b"), node("c")], ["b", "c"]),  # only new nodes: they serve
    (
        "probation",
        {"share": 0.0, "new_for_s": 60},
        FACTS,
        [node("a", quality=0.9, joined_at=NOW - 10), node("b", quality=0.9, joined_at=NOW - 100)],
        ["b"],
    ),
    ("target-node", {}, FACTS, [node("a"), node("b")], ["a", "b"]),
    ("target-node", {}, RequestFacts("m", target_node="b", is_challenge=True), [node("a"), node("b")], ["b"]),
]


@pytest.mark.parametrize("type_name,params,facts,nodes,expected", FILTER_CASES)
def test_filter(type_name, params, facts, nodes, expected):
    kept = plugin(type_name, **params).filter_nodes(facts, nodes, ctx())
    assert [n.node_id for n in kept] == expected


def test_probation_share_is_bounded():
    f = plugin("probation", share=0.05)
    nodes = [node("old", quality=0.9), node("new")]
    c = ctx(seed=7)
    new = sum(f.filter_nodes(FACTS, nodes, c)[0].node_id == "new" for _ in range(20_000))
    assert 0.04 < new / 20_000 < 0.06


# ---- scorers ---------------------------------------------------------------------------------
SCORER_CASES = [
    ("quality", {"unscored": 0.3}, [node("a", quality=0.9), node("b")], [0.9, 0.3]),
    # load normalised by capacity: 8/32 beats 4/8
    ("load", {"max_load": 1.0}, [node("a", capacity=32, in_flight=8), node("b", in_flight=4)], [0.75, 0.5]),
    ("load", {"max_load": 2.0}, [node("a", in_flight=8), node("b", in_flight=0)], [0.5, 1.0]),
    (
        "latency",
        {"output_tokens": 10},
        [
            node("a", ttft_ewma_s=0.1, tpot_ewma_s=0.01),
            node("b", ttft_ewma_s=0.2, tpot_ewma_s=0.02),
            node("c"),
        ],
        [1.0, 0.5, 0.5],
    ),
    ("latency", {"output_tokens": 0}, [node("a"), node("b")], [0.5, 0.5]),
    # a full node's latency stretches with its queue: 16 in flight on 8 slots = x 2.125
    (
        "latency",
        {"output_tokens": 0},
        [
            node("a", ttft_ewma_s=1.0, tpot_ewma_s=0.0, in_flight=16),
            node("b", ttft_ewma_s=1.0, tpot_ewma_s=0.0),
        ],
        [1 / 2.125, 1.0],
    ),
]


@pytest.mark.parametrize("type_name,params,nodes,expected", SCORER_CASES)
def test_scorer(type_name, params, nodes, expected):
    got = plugin(type_name, **params).score_nodes(FACTS, nodes, ctx())
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("max_tokens", "n", "expected"),
    [
        # a: fast first token, slow decode; b: the reverse. Predictions: a 0.1 + 0.05 t, b 0.5 + 0.01 t.
        (2, 1, [1.0, 0.2 / 0.52]),  # a short answer: the fast first token wins
        (100, 1, [1.5 / 5.1, 1.0]),  # a long one: the fast decode wins
        (50, 2, [1.5 / 5.1, 1.0]),  # n completions of max_tokens each: 100 tokens in all
        (None, 1, [0.7 / 1.1, 1.0]),  # no limit set: the parameter's 20 tokens (a 1.1 s, b 0.7 s)
    ],
)
def test_latency_predicts_with_the_requests_own_max_tokens(max_tokens, n, expected):
    from cluster.node_http import request_model
    from routing.selection import facts_for

    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    body = request_model("chat").model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": n, **limit}
    )
    facts = facts_for(body, {})
    assert facts.output_tokens == (None if max_tokens is None else max_tokens * n)
    nodes = [node("a", ttft_ewma_s=0.1, tpot_ewma_s=0.05), node("b", ttft_ewma_s=0.5, tpot_ewma_s=0.01)]
    got = plugin("latency", output_tokens=20).score_nodes(facts, nodes, ctx())
    assert got == pytest.approx(expected)


def test_affinity_sends_a_session_to_one_node_and_spills_when_it_is_loaded():
    aff = plugin("affinity", max_load=0.5)
    nodes = [node(f"n{i}") for i in range(10)]
    facts = RequestFacts("m", 10, "p", session_key="alice")
    first = aff.score_nodes(facts, nodes, ctx())
    assert sorted(first) == [0.0] * 9 + [1.0]
    owner = first.index(1.0)
    assert aff.score_nodes(facts, list(reversed(nodes)), ctx())[9 - owner] == 1.0  # order does not matter
    loaded = [node(n.node_id, in_flight=4 if i == owner else 0) for i, n in enumerate(nodes)]
    spilled = aff.score_nodes(facts, loaded, ctx())
    assert spilled[owner] == 0.0 and sum(spilled) == 1.0


def test_affinity_spreads_keys_and_moves_few_when_a_node_leaves():
    aff = plugin("affinity")
    nodes = [node(f"n{i}") for i in range(8)]
    owners = {}
    for k in range(800):
        s = aff.score_nodes(RequestFacts("m", 1, f"k{k}"), nodes, ctx())
        owners[k] = nodes[s.index(1.0)].node_id
    counts = [list(owners.values()).count(n.node_id) for n in nodes]
    assert min(counts) > 50  # ~100 each
    fewer = nodes[1:]
    moved = sum(
        fewer[aff.score_nodes(RequestFacts("m", 1, f"k{k}"), fewer, ctx()).index(1.0)].node_id != owners[k]
        for k in range(800)
    )
    assert moved == counts[0]  # only the keys of the node that left move


# ---- pickers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("totals,expected", [([0.1, 0.9, 0.5], {1}), ([0.9, 0.2, 0.9], {0, 2})])
def test_max_score_picks_the_best_and_breaks_ties_randomly(totals, expected):
    p = plugin("max-score")
    c = ctx(seed=3)
    assert {p.pick(FACTS, totals, c) for _ in range(200)} == expected


def test_weighted_random_follows_the_softmax():
    p = plugin("weighted-random", temperature=0.1)
    c = ctx(seed=1)
    totals = [1.0, 0.9, 0.0]
    counts = [0, 0, 0]
    for _ in range(20_000):
        counts[p.pick(FACTS, totals, c)] += 1
    w = [math.exp(x / 0.1) for x in totals]
    for got, weight in zip(counts, w):
        assert got / 20_000 == pytest.approx(weight / sum(w), abs=0.02)


def test_power_of_two_never_picks_the_worst_of_many():
    p = plugin("power-of-two")
    c = ctx(seed=2)
    totals = [0.5, 0.1, 0.9, 0.3]
    picks = [p.pick(FACTS, totals, c) for _ in range(2000)]
    assert 1 not in picks  # the lowest total loses every pair it is in
    assert picks.count(2) > picks.count(0) > picks.count(3)


def test_snapshot_rejects_nan_and_wrong_types():
    with pytest.raises(ValueError, match="quality"):
        node("a", quality=math.nan)
    with pytest.raises(ValueError, match="quality"):
        node("a", quality=1.5)
    with pytest.raises(ValueError, match="in_flight"):
        node("a", in_flight=True)
    with pytest.raises(ValueError, match="ttft_ewma_s"):
        node("a", ttft_ewma_s=math.inf)
    with pytest.raises(ValueError, match="capacity"):
        node("a", capacity=0)
    with pytest.raises(ValueError, match="prompt_tokens"):
        RequestFacts("m", -1)
