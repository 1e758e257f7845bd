"""benchmarks.idle attributes each process of a network to an owner by its title (or its nearest
ancestor's): a vLLM engine core counts for the replica that started it."""

from __future__ import annotations

import pytest

from benchmarks.idle import _group_of


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
