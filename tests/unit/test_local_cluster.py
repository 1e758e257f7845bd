"""HAProxy ingress settings of a network's Ray processes (cluster/local.py)."""

from __future__ import annotations

import socket

from cluster.local import HAPROXY_PORT_VARS, use_serve_fast_path


def test_haproxy_ports_inherited_from_a_running_network_are_replaced_and_a_free_one_is_kept(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)  # restored after the test
    with socket.socket() as busy, socket.socket() as spare:
        busy.bind(("0.0.0.0", 0))
        busy.listen()  # another network's HAProxy holds this one
        spare.bind(("0.0.0.0", 0))
        kept = spare.getsockname()[1]
        spare.close()  # free again: a port the caller chose
        stats, metrics = HAPROXY_PORT_VARS
        monkeypatch.setenv(stats, str(busy.getsockname()[1]))
        monkeypatch.setenv(metrics, str(kept))
        env = use_serve_fast_path()
        assert env[stats] != str(busy.getsockname()[1]) and int(env[stats]) > 0
        assert env[metrics] == str(kept)
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/meritnet-haproxy")  # Ray runs the guard


def test_without_haproxy_no_ports_are_taken(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    for key in HAPROXY_PORT_VARS:
        monkeypatch.delenv(key, raising=False)
    env = use_serve_fast_path()
    assert not set(HAPROXY_PORT_VARS) & set(env)
