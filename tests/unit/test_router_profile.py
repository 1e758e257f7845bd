"""The default profile end to end, and the property that a decision never picks a filtered-out node."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.router import NodeSnapshot, NoEligibleNode, RequestFacts, Router
from tests.support.router_nodes import NOW, node, snapshots

ROUTER = Router.from_yaml(clock=lambda: NOW, rng=random.Random(0))
FLOOR = 0.5  # deploy/profiles/default.yaml


def eligible(n: NodeSnapshot, facts: RequestFacts, exclude: frozenset[str]) -> bool:
    """The hard constraints of the organic profile (saturation and bans are soft: they fall back)."""
    return (
        n.model_id == facts.model
        and n.live
        and n.node_id not in exclude
        and (n.quality is None or n.quality >= FLOOR)
    )


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(snapshots, max_size=12, unique_by=lambda n: n.node_id),
    exclude=st.frozensets(st.sampled_from([f"n{i}" for i in range(12)]), max_size=4),
    session=st.none() | st.text(max_size=5),
    seed=st.integers(0, 2**16),
)
def test_never_picks_a_filtered_out_node_and_never_fails_while_one_is_eligible(nodes, exclude, session, seed):
    facts = RequestFacts("m", 50, "pfx", session_key=session)
    ok = [n for n in nodes if eligible(n, facts, exclude)]
    # below the floor, but otherwise eligible: served (degraded) only when no node is above it
    fallback = [n for n in nodes if n.model_id == "m" and n.live and n.node_id not in exclude]
    ROUTER.rng.seed(seed)
    if not fallback:
        with pytest.raises(NoEligibleNode):
            ROUTER.pick(facts, nodes, exclude=exclude)
        return
    d = ROUTER.pick(facts, nodes, exclude=exclude)
    assert d.node_id in {n.node_id for n in (ok or fallback)}
    assert d.degraded == (() if ok else ("quality-floor",))
    assert 0.0 <= d.score <= 1.0


def test_probation_node_gets_about_five_percent_and_low_quality_none():
    r = Router.from_yaml(clock=lambda: NOW, rng=random.Random(5))
    nodes = [node("good", quality=0.9), node("ok", quality=0.7), node("new"), node("bad", quality=0.2)]
    counts = {n.node_id: 0 for n in nodes}
    for i in range(10_000):
        counts[r.pick(RequestFacts("m", 10, f"p{i % 97}"), nodes).node_id] += 1
    assert counts["bad"] == 0
    assert 0.035 < counts["new"] / 10_000 < 0.065
    assert counts["good"] > counts["ok"]


def test_a_refusal_names_the_filter_that_removed_the_last_candidate():
    facts = RequestFacts("m", 10, "p")
    cases = {
        "live": [node("a", live=False), node("b", model_id="other")],
        "serves-model": [node("a", model_id="other")],
    }
    for stage, nodes in cases.items():
        with pytest.raises(NoEligibleNode) as refused:
            ROUTER.pick(facts, nodes)
        assert (refused.value.stage, stage in str(refused.value)) == (stage, True)
    with pytest.raises(NoEligibleNode) as refused:
        ROUTER.pick(facts, [node("a")], exclude=frozenset({"a"}))
    assert refused.value.stage == "excluded"
    # the quality floor does not refuse the last candidates: it serves the best, and says so
    d = ROUTER.pick(facts, [node("a", quality=0.2), node("c", quality=0.3), node("b", live=False)])
    assert (d.node_id, d.degraded) == ("c", ("quality-floor",))


def test_explain_lists_removals_and_per_scorer_scores():
    d = ROUTER.pick(
        RequestFacts("m", 10, "p"),
        [node("a", quality=0.9), node("b", quality=0.1), node("c", live=False)],
        explain=True,
    )
    assert d.node_id == "a"
    removed = dict(d.explanation.removed)
    assert removed["live"] == ("c",) and removed["quality-floor"] == ("b",)
    assert set(d.explanation.scores["a"]) == {"quality", "load", "latency", "affinity", "prefix", "total"}
    assert d.explanation.scores["a"]["total"] == pytest.approx(d.score)
    assert "latency" in d.explanation.timings_us


def test_challenge_reaches_its_target_even_below_the_floor_and_banned():
    facts = RequestFacts("m", 10, "p", is_challenge=True, target_node="bad")
    nodes = [node("good", quality=0.9), node("bad", quality=0.1, banned_until=NOW + 60)]
    assert ROUTER.pick(facts, nodes).node_id == "bad"
    assert ROUTER.pick(facts, nodes).profile == "challenge"


def test_fast_idle_node_wins_over_slow_and_full_node():
    nodes = [
        node("slow", tpot_ewma_s=0.1, quality=0.9),
        node("fast", tpot_ewma_s=0.01, quality=0.9),
        node("full", tpot_ewma_s=0.005, quality=0.9, in_flight=8),
    ]
    picks = [ROUTER.pick(RequestFacts("m", 10, f"p{i}"), nodes).node_id for i in range(50)]
    assert picks.count("fast") == 50


def test_scorer_out_of_range_or_nan_is_clamped():
    from routing.router import PickContext, Profile, Scorer
    from routing.router.columns import Columns
    from routing.router.framework import NoParams, PluginTimings
    from routing.router.pickers import MaxScore

    class Wild(Scorer):
        def score(self, facts, cols, mask, ctx):
            return [float("nan"), 7.0, -3.0]

    prof = Profile("t", [], [(Wild("wild", NoParams()), 2.0)], MaxScore("best", MaxScore.Params()))
    cols = Columns([node("a"), node("b"), node("c")])
    d = prof.run(
        RequestFacts("m"),
        cols,
        cols.mask(),
        PickContext(NOW, random.Random(0)),
        PluginTimings(),
        explain=True,
    )
    assert d.node_id == "b" and d.score == 1.0
    assert [d.explanation.scores[i]["wild"] for i in "abc"] == [0.0, 1.0, 0.0]
