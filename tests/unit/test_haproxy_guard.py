"""deploy/haproxy_guard.py on the config Ray 2.60's own template renders, and with the real haproxy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.haproxy_guard import UnsafeConfig, check, harden


@pytest.fixture
def ray_config(tmp_path) -> Path:
    """The file Ray Serve's HAProxyApi writes for an endpoint on 127.0.0.1 (its template, its code)."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=8000), socket_path=str(tmp_path / "admin.sock")
    )
    api = HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    return tmp_path / "haproxy.cfg"


def _binds(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        elif line.strip().startswith("bind "):
            found.setdefault(section, []).append(line.split()[1])
    return found


def test_ray_template_opens_side_listeners_everywhere_and_harden_closes_them(ray_config):
    text = ray_config.read_text()
    assert _binds(text)["listen stats"][0].startswith("*:")  # what Ray renders: all interfaces
    assert re.search(r"stats socket \S+ mode 666", text)
    hardened = harden(text)
    binds = _binds(hardened)
    assert binds["frontend http_frontend"] == ["127.0.0.1:8000"]  # the endpoint is left as configured
    assert binds["listen stats"][0].startswith("127.0.0.1:")
    assert binds["frontend prometheus"][0].startswith("127.0.0.1:")
    assert re.search(r"stats socket \S+ mode 600 ", hardened)
    assert "timeout http-request 10s" in hardened
    assert harden(hardened) == hardened  # a reload re-hardens the same file without piling up lines


DEFAULTS = "defaults\n    mode http\n"


@pytest.mark.parametrize(
    ("section", "line"),
    [
        ("listen stats", "  bind 10.0.0.5:8404"),
        ("listen stats", "  bind 192.168.1.2:8404 ssl crt x.pem"),
        ("frontend renamed_by_a_ray_upgrade", "    bind 10.0.0.5:9000"),  # not only the sections it knows
    ],
)
def test_a_side_listener_it_cannot_place_on_loopback_is_refused(section, line):
    with pytest.raises(UnsafeConfig, match=section):
        harden(f"global\n    maxconn 10\n{DEFAULTS}{section}\n{line}\n  stats enable\n")


def test_an_unknown_side_listener_on_every_interface_is_moved_to_loopback():
    hardened = harden(f"global\n    maxconn 10\n{DEFAULTS}frontend new_exporter\n    bind :9200\n")
    assert _binds(hardened)["frontend new_exporter"] == ["127.0.0.1:9200"]


def test_a_config_without_defaults_cannot_get_its_request_timeout_and_is_refused():
    with pytest.raises(UnsafeConfig, match="timeout http-request"):
        harden("global\n    maxconn 10\nfrontend http_frontend\n    bind 127.0.0.1:8000\n")


@pytest.mark.parametrize(
    "line", ["stats socket /tmp/x.sock mode 777 level admin", "stats socket /tmp/x.sock level admin"]
)
def test_an_admin_socket_that_is_not_owner_only_is_refused(line):
    with pytest.raises(UnsafeConfig, match="owner-only"):
        check(f"global\n    {line}\n{DEFAULTS}    timeout http-request 10s\n")


def test_the_guard_and_the_cluster_name_the_same_variable_for_an_operators_own_haproxy():
    from cluster.local import HAPROXY_REAL_BINARY_VAR
    from deploy.haproxy_guard import REAL_BINARY_VAR

    assert HAPROXY_REAL_BINARY_VAR == REAL_BINARY_VAR


def test_the_real_haproxy_accepts_the_hardened_config(ray_config):
    """`meritnet-haproxy -c -f CFG` (haproxy's own config check) hardens the file, then the real binary
    checks it: the rewritten config is valid HAProxy."""
    guard = Path(sys.executable).parent / "meritnet-haproxy"
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(guard)}
    done = subprocess.run([str(guard), "-c", "-f", str(ray_config)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _binds(ray_config.read_text())["listen stats"][0].startswith("127.0.0.1:")
