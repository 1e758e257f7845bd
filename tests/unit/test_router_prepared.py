"""The Router's fast path keeps decisions identical: per-node plugins precomputed per snapshot
(Profile.prepare), the generated weighted sum, sampled plugin timing. Each is checked against
the plain path (Router.pick over the same snapshots, every plugin run on every decision)."""

from __future__ import annotations

import random

import pytest
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.records import NodeStats
from routing.router import (
    DEFAULT_PROFILE_PATH,
    REGISTRY,
    NoEligibleNode,
    PickContext,
    RequestFacts,
    Router,
    load_config,
    parse_config,
)
from routing.router.framework import PluginTimings, _weigher
from tests.unit.test_router_profile import NOW, snapshots  # the same node strategy

OPERATOR = to_checksum_address("0x" + "22" * 20)
PARAMS = {"probation": {"share": 0.3, "new_for_s": 50.0}, "quality-floor": {"floor": 0.5},
          "quality": {"unscored": 0.3}, "load": {"max_load": 1.5}}


def plugin(t):
    cls = REGISTRY[t]
    return cls(t, cls.Params.model_validate(PARAMS.get(t, {})))


def config(profile: list[dict], plugins: list[dict]) -> dict:
    return {"plugins": plugins, "profiles": [{"name": "organic", "plugins": profile},
                                             {"name": "challenge", "plugins": [{"plugin": "best"}]}]}


P = [{"name": t, "type": t, "parameters": PARAMS.get(t, {})} for t in
     ("serves-model", "live", "not-banned", "quality-floor", "probation", "under-saturation", "quality", "load",
      "latency", "affinity")] + [{"name": "best", "type": "max-score"}, {"name": "soft", "type": "weighted-random"},
                                  {"name": "p2c", "type": "power-of-two"}]
CONFIGS = {
    "default": load_config(DEFAULT_PROFILE_PATH).model_dump(),
    # only `live` leads among the filters; no per-node scorer leads: totals start from latency
    "late-per-node": config([{"plugin": "live"}, {"plugin": "not-banned"}, {"plugin": "quality-floor"},
                             {"plugin": "latency", "weight": 2}, {"plugin": "quality", "weight": 1},
                             {"plugin": "load", "weight": 1}, {"plugin": "soft"}], P),
    # every scorer is per node (a zero weight too): totals are the precomputed sums alone
    "all-per-node": config([{"plugin": "serves-model"}, {"plugin": "quality-floor"}, {"plugin": "probation"},
                            {"plugin": "load", "weight": 2}, {"plugin": "quality", "weight": 0},
                            {"plugin": "p2c"}], P),
    # no scorer at all; no per-node filter leads
    "no-scorers": config([{"plugin": "not-banned"}, {"plugin": "live"}, {"plugin": "best"}], P),
}

fleets = st.lists(
    st.tuples(
        st.booleans(),                                   # live
        st.sampled_from([1, 4, 8, 32]),                  # capacity
        st.integers(0, 40),                              # requests in flight
        st.none() | st.floats(0, 1),                     # quality (None: unscored)
        st.none() | st.floats(0.001, 2.0),               # observed TTFT
        st.floats(0, NOW + 100),                         # joined_at
        st.booleans(),                                   # failed just now (banned)
        st.sampled_from(["m", "m", "other"]),            # model
    ),
    min_size=1, max_size=16,
)


def twin_routers(name: str, fleet, seed: int) -> tuple[Router, Router]:
    routers = []
    for _ in range(2):
        r = Router(parse_config(CONFIGS[name]), clock=lambda: NOW, rng=random.Random(seed))
        r.update_nodes([NodeStats(node_id=f"n{i}", model_id=model, operator=OPERATOR, accelerator_type="L4",
                                  capacity=cap, live=live, running_replicas=1, in_flight=0, joined_at=joined)
                        for i, (live, cap, _, _, _, joined, _, model) in enumerate(fleet)])
        r.update_quality({f"n{i}": node[3] for i, node in enumerate(fleet) if node[3] is not None})
        for i, (_, _, busy, _, ttft, _, failed, _) in enumerate(fleet):
            if ttft is not None:
                r.observe_success(f"n{i}", ttft, ttft / 50)
            for _ in range(busy):
                r.begin(f"n{i}")
            if failed:
                r.observe_failure(f"n{i}", NOW)
        routers.append(r)
    return routers[0], routers[1]


def outcome(fn, *args, **kwargs):
    try:
        d = fn(*args, **kwargs)
    except NoEligibleNode as exc:
        return ("none", str(exc))
    return (d.node_id, d.profile, d.score, d.candidates)


EVENTS = ["begin", "begin", "end", "fail", "succeed", "requality"]


def apply(router: Router, event: str, node: str, turn: int) -> None:
    """A fleet change between decisions, the same on both twins."""
    if event == "begin":
        router.begin(node)
    elif event == "end":
        router.end(node)
    elif event == "fail":
        router.observe_failure(node, NOW)
    elif event == "succeed":
        router.observe_success(node, 0.05 * (turn % 4 + 1), 0.001)
    else:  # a consensus round: rebuilds every snapshot
        router.update_quality({n.node_id: (turn * 0.37 + i * 0.11) % 1.0
                               for i, n in enumerate(router.snapshots()) if (i + turn) % 3})


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), fleet=fleets, seed=st.integers(0, 2**16),
       turns=st.lists(st.tuples(st.sampled_from(["", "p1", "p2"]), st.none() | st.sampled_from(["s1", "s2"]),
                                st.frozensets(st.sampled_from(["n0", "n1", "n5"]), max_size=2),
                                st.sampled_from(EVENTS), st.integers(0, 15)),
                      min_size=1, max_size=12))
def test_route_on_prepared_snapshots_decides_exactly_like_pick(name, fleet, seed, turns):
    fast, plain = twin_routers(name, fleet, seed)
    assert fast.snapshots() == plain.snapshots()
    for turn, (prefix, session, exclude, event, target) in enumerate(turns):
        facts = RequestFacts("m", 10, prefix, session_key=session)
        a = outcome(fast.route, facts, exclude=exclude)
        b = outcome(plain.pick, facts, plain.snapshots("m"), exclude=exclude)
        assert a == b  # same node, same score to the last bit, same candidates, same error message
        node = a[0] if a[0] != "none" else f"n{target % len(fleet)}"
        apply(fast, event, node, turn)
        apply(plain, event, node, turn)


def test_kept_lists_follow_verdicts_that_change_with_a_snapshot():
    """A per-node filter whose verdict flips on begin/end (no built-in does: theirs change only
    with registry or consensus updates, which rebuild everything)."""
    from routing.router.framework import Filter, register

    @register("test-fewer-than-2-in-flight")
    class FewInFlight(Filter):
        def filter(self, facts, nodes, ctx):
            return [n for n in nodes if n.in_flight < 2]

        def keeps(self, model, node):
            return node.in_flight < 2

    try:
        cfg = config([{"plugin": "few"}, {"plugin": "not-banned"}, {"plugin": "load", "weight": 1},
                      {"plugin": "best"}], P + [{"name": "few", "type": "test-fewer-than-2-in-flight"}])
        CONFIGS["few"] = cfg
        fleet = [(True, 4, i % 3, 0.9, 0.1, 0.0, False, "m") for i in range(6)]
        fast, plain = twin_routers("few", fleet, 1)
        for turn in range(40):
            facts = RequestFacts("m", 10, f"p{turn}")
            a = outcome(fast.route, facts)
            b = outcome(plain.pick, facts, plain.snapshots("m"))
            assert a == b
            node = a[0] if a[0] != "none" else f"n{turn % 6}"
            event = "begin" if turn % 3 else "end"
            apply(fast, event, node, turn)
            apply(plain, event, node, turn)
            if turn % 5 == 0:
                apply(fast, "end", f"n{turn % 6}", turn)
                apply(plain, "end", f"n{turn % 6}", turn)
    finally:
        del REGISTRY["test-fewer-than-2-in-flight"]
        CONFIGS.pop("few", None)


@settings(max_examples=100, deadline=None)
@given(nodes=st.lists(snapshots, min_size=1, max_size=12), model=st.sampled_from(["m", "other"]))
def test_per_node_forms_agree_with_the_list_forms(nodes, model):
    facts = RequestFacts(model, 10, "p")
    for t, cls in REGISTRY.items():
        p = plugin(t)
        if cls.kind == "filter" and cls.keeps is not None:
            kept = p.filter(facts, nodes, PickContext(NOW, random.Random(0)))
            assert kept == [n for n in nodes if p.keeps(model, n)], t
        if cls.kind == "scorer" and cls.score_node is not None:
            assert list(p.score(facts, nodes, PickContext(NOW, random.Random(0)))) == [p.score_node(n) for n in nodes]


def test_the_default_profile_precomputes_its_leading_per_node_plugins():
    organic = Router.from_yaml().profiles["organic"]
    assert [f.name for f in organic.node_filters] == ["serves-model", "live", "quality-floor"]
    assert [s.name for s, _ in organic.node_scorers] == ["quality", "load"]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), k=st.integers(0, 5), n=st.integers(1, 20))
def test_generated_weighted_sum_is_bit_identical_to_summing(data, k, n):
    weights = data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k))
    raws = [data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)) for _ in range(k)]
    expected = list(map(sum, zip(*[map(w.__mul__, r) for w, r in zip(weights, raws)]))) if k else [0.0] * n
    assert _weigher(weights)([None] * n, *raws) == expected


def test_an_emptied_candidate_list_names_the_filter_on_the_fast_path_too():
    fast, _ = twin_routers("default", [(False, 8, 0, 0.9, None, 0.0, False, "m")] * 3, 0)
    with pytest.raises(NoEligibleNode, match="filter 'live' removed every remaining candidate"):
        fast.route(RequestFacts("m"))
    with pytest.raises(NoEligibleNode, match="no candidate nodes"):
        fast.route(RequestFacts("m"), exclude={"n0", "n1", "n2"})


# ---- sampled plugin timing -------------------------------------------------------------------
def busy_router(**kw) -> Router:
    fleet = [(True, 8, i % 5, 0.6 + i / 50, 0.1, 0.0, False, "m") for i in range(10)]
    r, _ = twin_routers("default", fleet, 0)
    r.timings = PluginTimings(**kw)
    return r


def test_sampled_timing_records_one_decision_in_every():
    r = busy_router(every=4)
    for i in range(40):
        r.route(RequestFacts("m", 10, f"p{i}"))
    slots = r.timings.slots
    for step in ("not-banned", "probation", "not-saturated", "latency", "affinity", "best"):
        calls, ns = slots[f"organic/{step}"]
        assert calls == 10 and ns > 0  # 40 decisions, one in 4 timed
    # the leading per-node plugins do not run per decision: their cost moved to prepare()
    assert slots["organic/live"][0] == 0 and "organic/live" not in r.timings.mean_us()
    assert "organic/latency" in r.timings.mean_us()


def test_every_decision_is_timed_with_every_1_and_pick_times_every_plugin():
    r = busy_router(every=1)
    for i in range(5):
        r.pick(RequestFacts("m", 10, f"p{i}"), r.snapshots("m"))
    assert {k: v[0] for k, v in r.timings.slots.items() if k.startswith("organic/")} == {
        f"organic/{p}": 5 for p in ("serves-model", "live", "quality-floor", "not-banned", "probation",
                                    "not-saturated", "quality", "load", "latency", "affinity", "best")}


def test_an_explained_decision_is_always_timed_and_explained_in_full():
    r = busy_router(every=10**6)
    r.route(RequestFacts("m", 10, "warm"))  # the first decision of a profile is timed
    before = {k: v[0] for k, v in r.timings.slots.items()}
    d = r.route(RequestFacts("m", 10, "p"), explain=True)
    assert set(d.explanation.timings_us) == {"serves-model", "live", "quality-floor", "not-banned", "probation",
                                             "not-saturated", "quality", "load", "latency", "affinity", "best"}
    assert r.timings.slots["organic/latency"][0] == before["organic/latency"] + 1
    r.route(RequestFacts("m", 10, "q"))
    assert r.timings.slots["organic/latency"][0] == before["organic/latency"] + 1  # not sampled


def test_timed_and_untimed_decisions_agree():
    fleet = [(True, 8, i % 7, 0.55 + i / 40, 0.05 + i / 100, 0.0, i == 3, "m") for i in range(16)]
    for every in (1, 3):
        timed, _ = twin_routers("default", fleet, 9)
        untimed, _ = twin_routers("default", fleet, 9)
        timed.timings, untimed.timings = PluginTimings(every), PluginTimings(10**9)
        for i in range(60):
            facts = RequestFacts("m", 10, f"p{i % 9}", session_key="s" if i % 4 == 0 else None)
            a, b = timed.route(facts), untimed.route(facts)
            assert (a.node_id, a.score, a.candidates) == (b.node_id, b.score, b.candidates)
            timed.begin(a.node_id)
            untimed.begin(b.node_id)


def test_timing_every_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            PluginTimings(bad)
    assert Router.from_yaml(timing_every=7).timings.every == 7


# ---- affinity's key-hash cache ---------------------------------------------------------------
def test_affinity_key_cache_is_bounded_and_changes_no_score():
    from tests.unit.test_router_plugins import node

    nodes = [node(f"n{i}") for i in range(6)]
    cached = plugin("affinity")
    cached.CACHED_KEYS = 5
    for round_ in range(2):
        for k in range(12):
            facts = RequestFacts("m", 1, f"k{k}")
            assert cached.score(facts, nodes, PickContext(NOW, random.Random(0))) == \
                plugin("affinity").score(facts, nodes, PickContext(NOW, random.Random(0))), (round_, k)
            assert len(cached._hashes) <= 5
    long_key = RequestFacts("m", 1, "x" * 200)
    assert cached.score(long_key, nodes, PickContext(NOW, random.Random(0))) == \
        plugin("affinity").score(long_key, nodes, PickContext(NOW, random.Random(0)))
    assert "x" * 200 not in cached._hashes  # a client-sized key is hashed, not kept
