"""HAProxy ingress settings of a network's Ray processes (cluster/local.py): HAProxy's own ports, and a
block of direct-ingress ports per start."""

from __future__ import annotations

import socket

from cluster.local import HAPROXY_PORT_VARS, use_serve_fast_path


def _restore_direct_ingress_vars(monkeypatch) -> None:
    from cluster.local import DIRECT_INGRESS_RANGES

    for protocol in DIRECT_INGRESS_RANGES:
        monkeypatch.delenv(f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT", raising=False)
        monkeypatch.delenv(f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT", raising=False)


def test_haproxy_ports_inherited_from_a_running_network_are_replaced_and_a_free_one_is_kept(monkeypatch):
    _restore_direct_ingress_vars(monkeypatch)  # set by use_serve_fast_path; put back after the test
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


def test_each_start_takes_a_free_block_of_direct_ingress_ports(monkeypatch):
    from cluster.local import DIRECT_INGRESS_BLOCK, DIRECT_INGRESS_RANGES

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    lo, hi = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
    _restore_direct_ingress_vars(monkeypatch)
    first = use_serve_fast_path()
    base = int(first[lo])
    assert DIRECT_INGRESS_RANGES["HTTP"][0] <= base and int(first[hi]) == base + DIRECT_INGRESS_BLOCK - 1
    assert use_serve_fast_path()[lo] == str(base)  # still free: kept
    with socket.socket() as held:  # another cluster's replica now holds a port of that block
        held.bind(("0.0.0.0", base + 3))
        held.listen()
        moved = int(use_serve_fast_path()[lo])
    assert not moved <= base + 3 < moved + DIRECT_INGRESS_BLOCK
