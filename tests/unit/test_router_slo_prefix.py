"""Per-request TTFT targets (`x-slo-ttft-ms` -> the ttft-slo filter) and the prefix-cache scorer."""

from __future__ import annotations

import random

import pytest
from pydantic import BaseModel

from routing.errors import APIError
from routing.router import REGISTRY, PickContext, RequestFacts, Router
from routing.selection import facts_for, slo_ttft_s
from tests.support.router_nodes import NOW, node

CTX = PickContext(NOW, random.Random(0))


def plugin(type_name: str, **params):
    cls = REGISTRY[type_name]
    return cls(type_name, cls.Params.model_validate(params))


# ---- the header ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [("250", 0.25), (" 1500.5 ", 1.5005), ("600000", 600.0)])
def test_slo_header_is_read_in_milliseconds(value, seconds):
    assert slo_ttft_s({"x-slo-ttft-ms": value}) == pytest.approx(seconds)


def test_no_slo_header_means_no_target():
    assert slo_ttft_s({}) is None
    assert slo_ttft_s({"x-session-id": "s"}) is None


@pytest.mark.parametrize(
    "value", ["", "abc", "0", "-5", "nan", "inf", "-inf", "600001", "1e400", "1" * 40, "250ms", "0x10"]
)
def test_malformed_slo_header_is_a_400_not_a_crash(value):
    with pytest.raises(APIError) as exc:
        slo_ttft_s({"x-slo-ttft-ms": value})
    err = exc.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.code == "invalid_slo_header" and err.param == "x-slo-ttft-ms"


class ChatCompletionRequest(BaseModel):
    """The two fields facts_for reads of a chat request (importing Ray's model costs ~20 s)."""

    model: str
    messages: list[dict]


def test_facts_for_carries_the_target_and_prefix_blocks():
    system = "You are a careful assistant. " * 20
    a = ChatCompletionRequest(model="m", messages=[{"role": "system", "content": system + "first " * 30}])
    b = ChatCompletionRequest(model="m", messages=[{"role": "system", "content": system + "other " * 30}])
    fa = facts_for(a, {"x-slo-ttft-ms": "800"})
    fb = facts_for(b, {})
    assert fa.slo_ttft_s == pytest.approx(0.8) and fb.slo_ttft_s is None
    shared = len(system) // 64  # whole 64-character blocks inside the shared system prompt
    assert fa.prefix_blocks[:shared] == fb.prefix_blocks[:shared]
    assert fa.prefix_blocks[shared:] != fb.prefix_blocks[shared:]


# ---- the ttft-slo filter -------------------------------------------------------------------------
def test_slo_filter_drops_nodes_predicted_to_miss_and_keeps_untimed_ones():
    nodes = [
        node("fast", ttft_ewma_s=0.1),
        node("slow", ttft_ewma_s=2.0),
        # fast when idle, but every slot is busy: waits ~(9-8+1)/8 x (0.1 + 0.01 x 256) = 0.67 s
        node("full", ttft_ewma_s=0.1, in_flight=9),
        node("new", ttft_ewma_s=None, tpot_ewma_s=None),
    ]
    f = plugin("ttft-slo", output_tokens=256)
    kept = f.filter_nodes(RequestFacts("m", slo_ttft_s=0.5), nodes, CTX)
    assert [n.node_id for n in kept] == ["fast", "new"]
    assert [n.node_id for n in f.filter_nodes(RequestFacts("m", slo_ttft_s=1.0), nodes, CTX)] == [
        "fast",
        "full",
        "new",
    ]
    assert f.filter_nodes(RequestFacts("m"), nodes, CTX) == nodes  # no target: unchanged


def test_slo_filter_falls_back_to_every_candidate_when_none_qualifies():
    nodes = [node("a", ttft_ewma_s=1.0), node("b", ttft_ewma_s=2.0)]
    f = plugin("ttft-slo")
    assert f.filter_nodes(RequestFacts("m", slo_ttft_s=0.01), nodes, CTX) == nodes


def test_default_profile_honours_the_slo_and_still_serves_an_impossible_one():
    r = Router.from_yaml(clock=lambda: NOW, rng=random.Random(0))
    nodes = [node("quick", ttft_ewma_s=0.05, quality=0.8), node("steady", ttft_ewma_s=1.5, quality=1.0)]
    tight = RequestFacts("m", 10, slo_ttft_s=0.2)
    assert {r.pick(tight, nodes).node_id for _ in range(30)} == {"quick"}
    assert r.pick(RequestFacts("m", 10, slo_ttft_s=0.001), nodes).node_id in {"quick", "steady"}


# ---- the prefix-cache scorer ---------------------------------------------------------------------
def test_prefix_scorer_prefers_where_the_prefix_went_by_match_length_and_spills_under_load():
    s = plugin("prefix-cache", max_load=1.0)
    nodes = [node(f"n{i}") for i in range(4)]
    long = RequestFacts("m", prefix_blocks=tuple(range(16)))
    assert s.score_nodes(long, nodes, CTX) == [0.0] * 4  # nothing learned yet
    s.after_pick(RequestFacts("m", prefix_blocks=tuple(range(8))), "n1", CTX)  # half the prefix
    s.after_pick(long, "n2", CTX)  # all of it
    scores = s.score_nodes(long, nodes, CTX)
    assert scores[2] == 1.0 and 0.0 < scores[1] < 1.0 and scores[0] == scores[3] == 0.0
    other = RequestFacts("m", prefix_blocks=(99, 100, 101))
    assert s.score_nodes(other, nodes, CTX) == [0.0] * 4  # a different first block: no match at all
    busy = [node("n0"), node("n1"), node("n2", in_flight=8), node("n3")]  # capacity 8: at max_load
    assert s.score_nodes(long, busy, CTX)[2] == 0.0


def test_prefix_index_is_bounded():
    s = plugin("prefix-cache", index_entries=10, holders=2)
    for k in range(100):
        s.after_pick(RequestFacts("m", prefix_blocks=(k, k + 1000, k + 2000)), f"n{k % 5}", CTX)
    assert len(s._index) <= 10
    for k in range(3):
        s.after_pick(RequestFacts("m", prefix_blocks=(7,)), f"n{k}", CTX)
    assert list(s._index[7]) == ["n1", "n2"]  # the two most recent holders


def test_router_sends_a_shared_prefix_back_to_the_node_that_served_it():
    r = Router.from_yaml(clock=lambda: NOW, rng=random.Random(3))
    nodes = [node(f"n{i}", quality=0.9) for i in range(6)]
    system = tuple(range(40))
    first = r.pick(RequestFacts("m", 100, "", prefix_blocks=(*system, 1000)), nodes).node_id
    again = {
        r.pick(RequestFacts("m", 100, "", prefix_blocks=(*system, 2000 + k)), nodes).node_id
        for k in range(20)
    }
    assert again == {first}
