"""The registry's rules without Ray: liveness from Serve, load from gateways."""

import pytest

from cluster import NodeSpec
from cluster.registry import NodeRegistryCore

OP = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


def spec(node_id, accel="H100", capacity=8, replicas=1):
    return NodeSpec(
        node_id=node_id,
        operator=OP,
        model_id="default",
        model_source="/m",
        accelerator_type=accel,
        capacity=capacity,
        replicas=replicas,
    )


def test_nodes_start_not_live_until_serve_reports_a_running_replica():
    reg = NodeRegistryCore()
    reg.register(spec("a"), now=10.0)
    assert [s.live for s in reg.snapshot()] == [False]
    reg.set_liveness({"a": 1})
    (s,) = reg.snapshot()
    assert s.live and s.running_replicas == 1 and s.joined_at == 10.0


def test_dead_node_leaves_the_live_set():
    reg = NodeRegistryCore()
    reg.register(spec("a"))
    reg.register(spec("b", "L4"))
    reg.set_liveness({"a": 1, "b": 1})
    reg.set_liveness({"a": 1})
    assert {s.node_id: s.live for s in reg.snapshot()} == {"a": True, "b": False}


def test_an_open_node_stays_live_through_a_few_missed_probes_but_not_more():
    from cluster.registration import OpenNodePolicy
    from cluster.registry import OPEN_NODE_MISSES

    reg = NodeRegistryCore(policy=OpenNodePolicy(networks=("127.0.0.0/8",), without_validators=True))
    opened = spec("open").model_copy(update={"endpoint": "http://127.0.0.1:8100"})
    reg.claim(opened, nonce=1)
    reg.join(opened, "s", nonce=1)
    reg.register(spec("managed"))
    reg.set_liveness({})
    assert [s.live for s in reg.snapshot()] == [False, False]  # never answered: not live
    reg.set_liveness({"open": 1, "managed": 1})
    for _ in range(OPEN_NODE_MISSES - 1):  # a busy machine answers a probe late
        reg.set_liveness({})
        assert {s.node_id: s.live for s in reg.snapshot()} == {"open": True, "managed": False}
    reg.set_liveness({"open": 1})  # an answer resets the count
    for _ in range(OPEN_NODE_MISSES - 1):
        reg.set_liveness({})
    assert reg.snapshot()[0].live
    reg.set_liveness({})
    assert not reg.snapshot()[0].live


def test_load_sums_over_gateways_and_capacity_is_per_replica():
    reg = NodeRegistryCore()
    reg.register(spec("a", capacity=4, replicas=2))
    reg.report_load("gw1", {"a": 3})
    reg.report_load("gw2", {"a": 2})
    (s,) = reg.snapshot()
    assert s.in_flight == 5 and s.capacity == 4 and s.running_replicas == 0


def test_reregistering_a_different_spec_is_refused():
    reg = NodeRegistryCore()
    reg.register(spec("a"))
    reg.register(spec("a"))  # same spec: idempotent
    with pytest.raises(ValueError, match="already registered"):
        reg.register(spec("a", "L4"))


def test_a_restarted_registry_knows_its_nodes_again(tmp_path):
    """Issue 13: the registry was in memory; after a restart every model 404'd."""
    path = tmp_path / "registry.json"
    reg = NodeRegistryCore(path)
    reg.register(spec("a"), now=10.0)
    reg.register(spec("b", accel="L4"), now=11.0)
    reg.unregister("b")
    again = NodeRegistryCore(path)  # what Ray's restart of the actor does
    assert [(s.node_id, s.joined_at, s.live) for s in again.snapshot()] == [("a", 10.0, False)]
    again.set_liveness({"a": 1})
    assert again.snapshot()[0].live  # liveness is re-read from Serve, never persisted


def test_sync_holds_exactly_the_configured_nodes(tmp_path):
    reg = NodeRegistryCore(tmp_path / "registry.json")
    reg.sync([spec("a"), spec("b")], now=1.0)
    reg.sync([spec("a"), spec("b", capacity=4), spec("c")], now=2.0)  # b changed, c new
    assert {s.node_id: (s.joined_at, s.capacity) for s in reg.snapshot()} == {
        "a": (1.0, 8),
        "b": (2.0, 4),
        "c": (2.0, 8),
    }
    reg.sync([spec("c")], now=3.0)
    assert [s.node_id for s in NodeRegistryCore(tmp_path / "registry.json").snapshot()] == ["c"]


def test_the_actor_holds_the_policy_it_was_made_with_so_a_restart_restores_it():
    """Ray restarts a crashed registry with its constructor's arguments: the open-node policy is one of
    them (issue 28's policy was lost on a restart, and every later join was refused `no_validators`)."""
    from cluster.registration import OpenNodePolicy
    from cluster.registry import NodeRegistry

    policy = OpenNodePolicy.for_network("127.0.0.1", [8000], without_validators=None)
    NodeRegistry(policy=policy)._core.policy.admits_open_nodes()  # loopback network: admitted
