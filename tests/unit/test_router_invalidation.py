"""The router's precomputed state (its columns, cached static filter masks and static scores) always
equals a from-scratch computation, after any sequence of updates to every input it depends on:
quality, bans and successes, liveness and node lists, load."""

from __future__ import annotations

import random

import numpy as np
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.records import NodeStats
from routing.router import RequestFacts, Router
from routing.router.columns import COLUMNS, Columns
from tests.support.clock import Clock
from tests.support.router_nodes import NOW as profile_now
from tests.support.router_nodes import snapshots as profile_snapshots

IDS = [f"n{i}" for i in range(8)]
OPERATOR = to_checksum_address("0x" + "22" * 20)


def stats(live: dict[str, bool], present: set[str], in_flight: dict[str, int]) -> list[NodeStats]:
    return [
        NodeStats(
            node_id=n,
            model_id="m",
            operator=OPERATOR,
            accelerator_type="L4",
            capacity=2 + i % 3,
            live=live[n],
            running_replicas=1,
            in_flight=in_flight[n],
            joined_at=0.0,
        )
        for i, n in enumerate(IDS)
        if n in present
    ]


node_ids = st.sampled_from(IDS)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("quality"), st.dictionaries(node_ids, st.floats(0, 1), max_size=8)),
        st.tuples(st.just("live"), node_ids, st.booleans()),
        st.tuples(st.just("leave"), node_ids, st.booleans()),
        st.tuples(st.just("reported"), node_ids, st.integers(0, 6)),
        st.tuples(st.just("begin"), node_ids),
        st.tuples(st.just("end"), node_ids),
        st.tuples(st.just("failure"), node_ids),
        st.tuples(st.just("success"), node_ids, st.floats(0.001, 5), st.floats(0.001, 0.5)),
        st.tuples(st.just("tick"), st.floats(0, 40)),
    ),
    min_size=1,
    max_size=25,
)


def assert_matches_scratch(router: Router, facts: RequestFacts) -> None:
    cols = router._cols.get("m")
    if cols is None:
        return
    scratch = Columns([router._snapshot(n) for n in cols.ids])
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(cols, name), getattr(scratch, name), err_msg=name)
    prof = router.profiles["organic"]
    state = router.rng.getstate()
    try:
        cached = router.route(facts)
    except LookupError as exc:
        cached = type(exc).__name__
    router.rng.setstate(state)
    try:
        fresh = router.route(facts, cached=False)
    except LookupError as exc:
        fresh = type(exc).__name__
    assert cached == fresh
    # and the cached mask itself equals the static filters run on the rebuilt columns
    from routing.router.framework import PickContext

    ctx = PickContext(router.clock(), random.Random(0))
    expect = scratch.mask()
    for f in prof.static_filters:
        expect = f.filter(facts, scratch, expect, ctx)
    np.testing.assert_array_equal(prof._static_mask(facts, cols, ctx), expect)


@settings(max_examples=60, deadline=None)
@given(steps=steps, session=st.none() | st.sampled_from(["a", "b"]))
def test_precomputed_state_equals_a_from_scratch_computation(steps, session):
    clock = Clock()
    router = Router.from_yaml(clock=clock, rng=random.Random(1))
    live = dict.fromkeys(IDS, True)
    present = set(IDS)
    reported = dict.fromkeys(IDS, 0)
    router.update_nodes(stats(live, present, reported))
    facts = RequestFacts("m", 100, "p", session)
    assert_matches_scratch(router, facts)
    for step in steps:
        kind = step[0]
        if kind == "quality":
            router.update_quality(step[1])
        elif kind in ("live", "leave", "reported"):
            if kind == "live":
                live[step[1]] = step[2]
            elif kind == "leave":
                (present.discard if step[2] else present.add)(step[1])
            else:
                reported[step[1]] = step[2]
            router.update_nodes(stats(live, present, reported))
        elif kind == "begin":
            router.begin(step[1])
        elif kind == "end":
            router.end(step[1])
        elif kind == "failure":
            router.observe_failure(step[1])
        elif kind == "success":
            router.observe_success(step[1], step[2], step[3])
        else:
            clock.t += step[1]
        assert_matches_scratch(router, facts)


@settings(max_examples=150, deadline=None)
@given(
    nodes=st.lists(profile_snapshots, min_size=1, max_size=10, unique_by=lambda n: n.node_id),
    blocks=st.lists(st.integers(0, 5), max_size=6),
    key=st.none() | st.text(max_size=3),
    data=st.data(),
)
def test_bounded_scorers_stay_in_the_unit_interval_on_their_candidates(nodes, blocks, key, data):
    """The framework skips clamping scorers marked `bounded`; this holds them to it."""
    from routing.router import REGISTRY, PickContext

    cols = Columns(nodes)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=len(nodes), max_size=len(nodes))))
    facts = RequestFacts("m", 10, "p", key, prefix_blocks=tuple(blocks))
    ctx = PickContext(profile_now, random.Random(0))
    for name, cls in REGISTRY.items():
        if cls.kind != "scorer" or not cls.bounded:
            continue
        s = cls(name, cls.Params())
        s.after_pick(RequestFacts("m", prefix_blocks=tuple(blocks[:3])), nodes[0].node_id, ctx)
        out = np.asarray(s.score(facts, cols, mask, ctx))[mask]
        assert np.all((out >= 0.0) & (out <= 1.0)), (name, out)
