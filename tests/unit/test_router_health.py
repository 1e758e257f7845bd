"""Bans with exponential backoff, EWMAs, timeouts and the Prometheus view, on an injectable clock."""

from __future__ import annotations

import random

import pytest
from eth_utils import to_checksum_address
from prometheus_client import CollectorRegistry

from cluster.records import NodeStats
from routing.router import NoEligibleNode, RequestFacts, Router, parse_config
from tests.support.clock import Clock

OP = to_checksum_address("0x" + "22" * 20)
CONFIG = {
    "plugins": [
        {"name": "model", "type": "serves-model"},
        {"name": "live", "type": "live"},
        {"name": "not-banned", "type": "not-banned"},
        {"name": "load", "type": "load"},
        {"name": "best", "type": "max-score"},
    ],
    "profiles": [
        {
            "name": "organic",
            "plugins": [
                {"plugin": "model"},
                {"plugin": "live"},
                {"plugin": "not-banned"},
                {"plugin": "load", "weight": 1},
                {"plugin": "best"},
            ],
        },
        {"name": "challenge", "plugins": [{"plugin": "model"}, {"plugin": "best"}]},
    ],
    "health": {
        "ban_base_s": 1.0,
        "ban_max_s": 8.0,
        "ewma_alpha": 0.5,
        "timeouts": {"min_s": 2.0, "max_s": 30.0, "ttft_multiplier": 10.0},
    },
}


def _stats(*node_ids: str) -> list[NodeStats]:
    return [
        NodeStats(
            node_id=node_id,
            model_id="m",
            operator=OP,
            accelerator_type="L4",
            capacity=4,
            live=True,
            running_replicas=1,
            joined_at=0.0,
        )
        for node_id in node_ids
    ]


def make(n: int = 3, registry=None):
    clock = Clock(100.0)
    router = Router(parse_config(CONFIG), clock=clock, rng=random.Random(0), registry=registry)
    router.update_nodes(_stats(*(f"n{i}" for i in range(n))))
    return router, clock


FACTS = RequestFacts("m", 10, "p")


@pytest.mark.parametrize(
    "failures,expected_ban", [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (20, 8.0)]
)
def test_ban_doubles_per_consecutive_failure_up_to_the_cap(failures, expected_ban):
    router, clock = make()
    until = clock.t
    for _ in range(failures):
        clock.t = until  # each failure comes when the previous ban ran out
        until = router.observe_failure("n0")
    assert until == pytest.approx(clock.t + expected_ban)


def test_failures_during_a_ban_are_one_incident_and_do_not_escalate():
    """A hung node's queued attempts time out one after another: one ban, not ban_max_s."""
    router, clock = make()
    first = router.observe_failure("n0")
    for _ in range(10):
        clock.t += 0.05
        assert router.observe_failure("n0") == first
    st = router.health.state("n0")
    assert st.error_streak == 1 and st.last_failure_at == pytest.approx(clock.t)
    clock.t = first + 0.01  # the ban ran out, the node got another chance and failed it
    assert router.observe_failure("n0") == pytest.approx(clock.t + 2.0)


def test_banned_node_gets_no_traffic_until_the_ban_expires_and_success_clears_it():
    router, clock = make()
    clock.t = router.observe_failure("n0")
    router.observe_failure("n0")  # failed again once the 1 s ban ran out: banned for 2 s
    assert all(router.route(FACTS).node_id != "n0" for _ in range(50))
    clock.t += 2.01
    assert "n0" in {router.route(FACTS).node_id for _ in range(50)}
    router.observe_failure("n0")  # streak 3: 4 s
    assert router.health.state("n0").banned_until == pytest.approx(clock.t + 4)
    router.observe_success("n0", 0.1, 0.01)
    st = router.health.state("n0")
    assert st.error_streak == 0 and st.banned_until == 0.0
    router.observe_failure("n0")  # back to the base ban after a success
    assert st.banned_until == pytest.approx(clock.t + 1.0)


def test_never_ban_every_node_least_recently_failed_stays_eligible():
    router, clock = make()
    for i, node in enumerate(["n1", "n0", "n2"]):
        router.observe_failure(node, now=clock.t + 0.1 * i)  # n1 failed first
    clock.t += 0.5  # every ban (1 s) still runs
    assert {router.route(FACTS).node_id for _ in range(20)} == {"n1"}
    assert router.health.is_banned("n1")  # still banned (and shown so), only kept eligible


def test_retry_excludes_nodes_that_already_failed_this_request():
    router, _ = make()
    tried = {router.route(FACTS).node_id}
    second = router.route(FACTS, exclude=frozenset(tried)).node_id
    assert second not in tried
    tried.add(second)
    third = router.route(FACTS, exclude=frozenset(tried)).node_id
    assert third not in tried
    tried.add(third)
    with pytest.raises(NoEligibleNode, match="no eligible node for model 'm'"):
        router.route(FACTS, exclude=frozenset(tried))


def test_ewma_and_per_node_timeout():
    router, _ = make()
    assert router.timeout_s("n0") == 30.0  # unknown TTFT: the maximum
    router.observe_success("n0", ttft_s=1.0, tpot_s=0.1)
    router.observe_success("n0", ttft_s=2.0, tpot_s=0.3)
    st = router.health.state("n0")
    assert (st.ttft_ewma_s, st.tpot_ewma_s) == pytest.approx((1.5, 0.2))
    assert router.timeout_s("n0") == pytest.approx(15.0)
    router.observe_success("n1", ttft_s=0.01)
    assert router.timeout_s("n1") == 2.0  # clamped to min_s
    router.observe_success("n1", ttft_s=float("nan"))  # ignored, never poisons the EWMA
    assert router.health.state("n1").ttft_ewma_s == pytest.approx(0.01)
    snap = {s.node_id: s for s in router.snapshots("m")}["n0"]
    assert snap.ttft_ewma_s == pytest.approx(1.5)


def test_ban_gauge_follows_the_clock():
    registry = CollectorRegistry()
    router, clock = make(registry=registry)
    router.observe_failure("n1")
    assert registry.get_sample_value("meritnet_node_banned", {"node": "n1"}) == 1.0
    assert registry.get_sample_value("meritnet_node_banned", {"node": "n0"}) == 0.0
    assert registry.get_sample_value("meritnet_node_error_streak", {"node": "n1"}) == 1.0
    clock.t += 1.5
    assert registry.get_sample_value("meritnet_node_banned", {"node": "n1"}) == 0.0
    make(registry=CollectorRegistry())  # a second router in another registry: no duplicate error


def test_in_flight_tracking_moves_traffic():
    router, _ = make(n=2)
    for _ in range(3):
        router.begin("n0")
    assert router.route(FACTS).node_id == "n1"
    assert {s.node_id: s.in_flight for s in router.snapshots("m")} == {"n0": 3, "n1": 0}
    for _ in range(3):
        router.end("n0")
    router.end("n0")  # never below zero
    assert router.in_flight("n0") == 0


def test_a_node_whose_only_sample_was_slow_is_timed_again_once_its_estimate_is_stale():
    """Issue 25 follow-up, seen on an AMX Xeon: h100-a's first (cold) request took 65 ms, l4-b's 5 ms;
    the latency scorer then sent l4-b every request and h100-a was never timed again. A stale estimate
    is forgotten, so the node scores as untimed (the scorer's optimistic `unknown`) and is measured anew."""
    config = {
        **CONFIG,
        "plugins": [
            *CONFIG["plugins"][:-1],
            {"name": "latency", "type": "latency", "parameters": {"unknown": 1.0}},
            CONFIG["plugins"][-1],
        ],
        "profiles": [
            {
                "name": "organic",
                "plugins": [{"plugin": "model"}, {"plugin": "latency", "weight": 1}, {"plugin": "best"}],
            },
            CONFIG["profiles"][1],
        ],
        "health": {**CONFIG["health"], "latency_stale_s": 10.0},
    }
    clock = Clock(100.0)
    router = Router(parse_config(config), clock=clock, rng=random.Random(0), registry=None)
    stats = _stats("slow-once", "fast")
    router.update_nodes(stats)
    router.observe_success("slow-once", 0.065, 0.005)
    router.observe_success("fast", 0.005, 0.005)
    picked = []
    for _ in range(25):  # one request a second, each timing the node it went to
        router.update_nodes(stats)  # the background refresh
        node = router.route(FACTS).node_id
        picked.append(node)
        router.observe_success(node, 0.005, 0.005)
        clock.t += 1.0
    assert picked[:10] == ["fast"] * 10  # its one sample says slow-once is slow, until it is 10 s old
    assert "slow-once" in picked[10:20]  # then it is untimed, ties with the best (a coin flip), is measured
    assert picked[-8:].count("slow-once") >= 1  # now as fast as the other: both get traffic
