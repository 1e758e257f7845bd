"""cluster/haproxy_guard.py on the config Ray 2.60's own template renders, and with the real haproxy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.haproxy_guard import UnsafeConfig, check, harden


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


@pytest.mark.parametrize("line", ["  bind 10.0.0.5:8404", "  bind 192.168.1.2:8404 ssl crt x.pem"])
def test_a_side_listener_it_cannot_place_on_loopback_is_refused(line):
    with pytest.raises(UnsafeConfig, match="listen stats"):
        harden(f"global\n    maxconn 10\nlisten stats\n{line}\n  stats enable\n")


def test_a_world_writable_admin_socket_is_refused():
    with pytest.raises(UnsafeConfig, match="mode 777"):
        check("global\n    stats socket /tmp/x.sock mode 777 level admin\n")


def test_the_real_haproxy_accepts_the_hardened_config(ray_config):
    """`meritnet-haproxy -c -f CFG` (haproxy's own config check) hardens the file, then the real binary
    checks it: the rewritten config is valid HAProxy."""
    guard = Path(sys.executable).parent / "meritnet-haproxy"
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(guard)}
    done = subprocess.run([str(guard), "-c", "-f", str(ray_config)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _binds(ray_config.read_text())["listen stats"][0].startswith("127.0.0.1:")
