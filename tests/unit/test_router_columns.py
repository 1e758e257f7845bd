"""The large-fleet path (numpy Columns) keeps, scores and picks exactly like the list path."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.router import REGISTRY, PickContext, RequestFacts
from routing.router.columns import Columns
from tests.unit.test_router_profile import NOW, snapshots  # the same node strategy

PARAMS = {
    "probation": {"share": 0.3, "new_for_s": 50.0},
    "under-saturation": {"max_load": 1.0},
    "quality-floor": {"floor": 0.5},
    "affinity": {"max_load": 0.8},
    "latency": {"output_tokens": 100},
}
FILTERS = [t for t, c in REGISTRY.items() if c.kind == "filter"]
SCORERS = [t for t, c in REGISTRY.items() if c.kind == "scorer"]
PICKERS = [t for t, c in REGISTRY.items() if c.kind == "picker"]


def plugin(t):
    cls = REGISTRY[t]
    return cls(t, cls.Params.model_validate(PARAMS.get(t, {})))


nodesets = (
    st.lists(snapshots, min_size=1, max_size=12, unique_by=lambda n: n.node_id)
    .map(lambda ns: [n for n in ns if n.model_id == "m"] or None)
    .filter(bool)
)
factses = st.builds(
    RequestFacts,
    model=st.just("m"),
    prompt_tokens=st.integers(0, 100),
    prefix_hash=st.sampled_from(["", "abc", "def"]),
    session_key=st.none() | st.text(max_size=3),
    target_node=st.none() | st.sampled_from(["n1", "n2", "zz"]),
)


@settings(max_examples=200, deadline=None)
@given(nodes=nodesets, facts=factses, seed=st.integers(0, 1000))
def test_every_filter_and_scorer_agrees_across_paths(nodes, facts, seed):
    cols = Columns("m", nodes)
    idx = cols.rows()
    for t in FILTERS:
        f = plugin(t)
        listed = [n.node_id for n in f.filter(facts, nodes, PickContext(NOW, random.Random(seed)))]
        vec = [cols.ids[i] for i in f.filter_idx(facts, cols, idx, PickContext(NOW, random.Random(seed)))]
        assert listed == vec, t
    for t in SCORERS:
        s = plugin(t)
        listed = s.score(facts, nodes, PickContext(NOW, random.Random(seed)))
        vec = s.score_idx(facts, cols, idx, PickContext(NOW, random.Random(seed)))
        assert np.allclose(listed, vec), t


@pytest.mark.parametrize("t", PICKERS)
def test_pickers_agree_across_paths(t):
    p = plugin(t)
    data = random.Random(4)
    for _ in range(300):
        totals = [round(data.random(), 1) for _ in range(data.randrange(2, 9))]
        seed = data.randrange(10**6)
        a = p.pick(RequestFacts("m"), totals, PickContext(NOW, random.Random(seed)))
        b = p.pick_array(RequestFacts("m"), np.array(totals), PickContext(NOW, random.Random(seed)))
        assert a == b


def test_router_uses_columns_for_big_models_with_the_same_decisions():
    from benchmarks.router import build_router

    big, small = build_router(300, seed=3), build_router(300, seed=3)
    small.columns_from = 10**9
    assert big.profiles["organic"].vectorised
    for i in range(200):
        facts = RequestFacts("default", 10, f"p{i}", session_key=f"s{i % 7}" if i % 2 else None)
        exclude = frozenset({f"node-{i}", f"node-{i + 1}"})
        a, b = big.route(facts, exclude=exclude), small.route(facts, exclude=exclude)
        assert (a.node_id, a.candidates) == (b.node_id, b.candidates)
        assert a.score == pytest.approx(b.score)
        big.begin(a.node_id)
        small.begin(b.node_id)
    d = big.route(RequestFacts("default", 10, "x"), explain=True)
    assert d.explanation.scores[d.node_id]["total"] == pytest.approx(d.score)
