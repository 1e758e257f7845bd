"""Issue 28 item 12, on the running network: the HAProxy that Ray Serve started for it listens on the
endpoint's interface only (stats page and exporter on 127.0.0.1), its admin socket is owner-only, and a
client that never finishes its request head is cut off."""

from __future__ import annotations

import os
import socket
import stat
from urllib.parse import urlsplit

import psutil
import pytest

pytestmark = pytest.mark.integration


def _haproxies(port: int) -> list[psutil.Process]:
    """HAProxy processes serving this network's endpoint port (its config says `bind 127.0.0.1:PORT`)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "haproxy" and "-f" in cmd[:-1]:
            try:
                config = open(cmd[cmd.index("-f") + 1]).read()
            except OSError:
                continue
            if f":{port}\n" in config:
                found.append(proc)
    return found


def test_haproxy_listens_on_loopback_only_with_a_private_admin_socket(network):
    port = urlsplit(network.base_url).port
    procs = _haproxies(port)
    if not procs:
        pytest.skip("this network runs Serve's own proxy (RAY_SERVE_ENABLE_HA_PROXY=0): no HAProxy")
    for proc in procs:
        listening = {c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening, "HAProxy listens nowhere?"
        assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening
        assert port in {addr.port for addr in listening}
        cmd = proc.cmdline()
        config = open(cmd[cmd.index("-f") + 1]).read()
        sockets = [
            line.split()[2] for line in config.splitlines() if line.strip().startswith("stats socket ")
        ]
        assert sockets
        for path in sockets:
            if os.path.exists(path):
                assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, oct(os.stat(path).st_mode)


def test_a_client_that_never_finishes_its_request_head_is_cut_off(network):
    from tests.support.waiting import wait_until

    url = urlsplit(network.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        conn.settimeout(1.0)
        received = bytearray()

        def closed() -> bool:
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                return False
            received.extend(chunk)
            return not chunk

        wait_until(closed, timeout_s=60, interval_s=0)
    assert not received or received.startswith(b"HTTP/1.1 408"), bytes(received[:200])
