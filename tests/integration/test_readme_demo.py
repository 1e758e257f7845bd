"""The README's main job, as a new user runs it: `meritnet up` (what `make demo` runs), the README's
curl and Python snippets against it, `meritnet status` from another process, then Ctrl-C."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.meritnet_up import start_meritnet_up, stop_meritnet_up
from tests.support.ports import free_port
from tests.support.readme import blocks
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

MERITNET = Path(sys.executable).with_name("meritnet")


def _cli(cwd: Path, command: str) -> str:
    """Run a README `meritnet ...` command line with this checkout's meritnet; its output."""
    r = subprocess.run(
        ["bash", "-c", f"{MERITNET.parent}/{command}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, (command, r.stdout, r.stderr[-2000:])
    return r.stdout


def _status(port: int, secret: str | None) -> int:
    import urllib.error
    import urllib.request

    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {secret}"} if secret else {}),
    }
    body = b'{"model": "default", "prompt": "hi", "max_tokens": 2}'
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_readme_demo_commands_work(tmp_path):
    port = free_port()
    proc, started = start_meritnet_up(["up", "--port", str(port)], tmp_path, {**os.environ, "COLUMNS": "200"})
    try:
        assert "Press Ctrl-C to stop" in started, started[-3000:]

        (curl,) = blocks("### Calling it", "bash")
        r = subprocess.run(
            ["bash", "-c", curl.replace(":8000", f":{port}")], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and '"choices"' in r.stdout, (r.stdout, r.stderr)

        (snippet,) = blocks("### Calling it", "python")
        r = subprocess.run(
            [sys.executable, "-c", snippet.replace(":8000", f":{port}")],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "completion_tokens=" in r.stdout  # the streamed usage chunk was printed
        assert re.search(r"2 vectors of \d+ floats", r.stdout), r.stdout  # embeddings
        assert "json_schema: {'mood':" in r.stdout and "tool call: Function(arguments='{" in r.stdout, (
            r.stdout
        )
        assert "default-embed ['embeddings'] 1 nodes" in r.stdout, r.stdout  # the catalogue

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # as another terminal
        r = subprocess.run(
            [str(MERITNET), "status"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "COLUMNS": "200"},
        )
        assert r.returncode == 0 and all(n in r.stdout for n in ("h100-a", "l4-b", "l4-embed")), (
            r.stdout + r.stderr[-2000:]
        )

        # The README's key commands, in order: create with limits and with a budget (both secrets work,
        # no key is refused), list (the budgeted key's spend is what its request was charged), revoke.
        create, create_budget, list_, revoke = [
            line.split("#")[0].strip() for line in blocks("### API keys", "bash")[0].splitlines()
        ]
        made = [_cli(tmp_path, command) for command in (create, create_budget)]
        (secret, key_id), (budget_secret, budget_id) = [
            (
                next(line for line in out.splitlines() if line.startswith("mn-")),
                re.search(r"key id (k-[0-9a-f]+)", out).group(1),
            )
            for out in made
        ]
        # the gateway re-reads the key file within a refresh; the budgeted key reserves in the usage store
        wait_until(
            lambda: (
                _status(port, None) == 401 and all(_status(port, s) == 200 for s in (secret, budget_secret))
            ),
            timeout_s=60,
            interval_s=1,
        )
        listed = _cli(tmp_path, list_)
        assert key_id in listed and secret not in listed and budget_secret not in listed
        budget_row = next(line for line in listed.splitlines() if budget_id in line)
        assert "1000000/month" in budget_row
        spent = int(budget_row.split("1000000/month")[1].split()[1].strip("│|"))  # the spend column
        assert 0 < spent <= 2 + 4  # its one request: BOS + "hi" (at most 2 tokens) and 2 completion tokens
        _cli(tmp_path, revoke.replace("k-1a2b3c4d", key_id))
        wait_until(lambda: _status(port, secret) == 401, timeout_s=60, interval_s=1)
    finally:
        rest = stop_meritnet_up(proc)
    assert proc.returncode == 0 and "Stopped." in rest, rest[-3000:]
