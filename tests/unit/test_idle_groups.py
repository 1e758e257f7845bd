"""benchmarks.idle attributes each process of a network to an owner by its title (or its nearest
ancestor's): a vLLM engine core counts for the replica that started it."""

from __future__ import annotations

import pytest

from benchmarks.idle import _group_of, _owner


@pytest.mark.parametrize(
    ("title", "group"),
    [
        ("ray::ServeReplica:node-h100-a:node-h100-a", "nodes"),
        ("ray::ServeReplica:meritnet:gateway", "control_plane"),
        ("ray::NodeRegistry", "control_plane"),
        ("ray::ValidatorActor.challenge_forever", "validators"),
        ("ray::ServeController.get_serve_instance_details", "ray"),
        ("ray::IDLE", "ray"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "ray"),
        ("VLLM::EngineCore", None),  # grouped with its parent process
    ],
)
def test_process_titles_map_to_their_owner(title, group):
    assert _group_of(title) == group


def test_a_process_without_a_group_takes_its_nearest_ancestors():
    tree = {
        1: ("python -m benchmarks.idle", 0),
        2: ("ray::ServeReplica:node-l4-b:node-l4-b", 1),
        3: ("VLLM::EngineCore", 2),
        4: ("ray::ReferenceEngineService", 1),
        5: ("VLLM::EngineCore", 4),
        6: ("sh -c something", 1),
        7: ("sleep 1", 6),
    }
    owners = {pid: _owner(pid, tree, driver=1) for pid in tree}
    assert owners == {
        1: "driver",
        2: "nodes",
        3: "nodes",
        4: "validators",
        5: "validators",
        6: "other",
        7: "other",
    }
