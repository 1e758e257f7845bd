"""The README's "Run a node", verbatim, as a new operator runs it (issue 27): a network runner's
`meritnet up --chain anvil` in one folder; in another folder, with none of the network's files and its
own Ray instance, the README's three commands (keygen, serve, join; only the network URL and the port
filled in), traffic until the node serves a request, its reward through `meritnet node rewards`, then
`meritnet settlement claim --network URL` with the operator's keystore: the operator's token balance on
anvil equals its cumulative reward."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from eth_utils import to_checksum_address

from tests.support.meritnet_up import start_meritnet_up, stop_meritnet_up
from tests.support.ports import free_port
from tests.support.readme import section as readme_section

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
EPOCH_S = 10
NODE_ID = "my-node"  # the README's


def _section() -> str:
    return readme_section("## Run a node")


def _commands() -> tuple[list[str], str, str]:
    """The README's block (keygen, serve, join), and its `node rewards` and `settlement claim --network`
    commands (written across a bullet's lines: joined)."""
    section = _section()
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    flat = re.sub(r"\s+", " ", section)
    rewards = re.search(r"`(meritnet node rewards [^`]+)`", flat).group(1)
    claim = re.search(r"`(meritnet settlement claim --network [^`]+)`", flat).group(1)
    return lines, rewards, claim


def _served_by(port: int, node_id: str, limit_s: float = 90) -> str:
    """Completions, two at a time, until `node_id` serves one (a new node gets a probation share of the
    traffic): its request id."""

    def one(_):
        # a prompt of its own: the router sends a prompt it has seen to the node that holds its prefix
        body = {"model": "default", "prompt": f"{uuid.uuid4().hex} Hello", "max_tokens": 4}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-meritnet-node"], r.headers["x-meritnet-request-id"]

    deadline, sent = time.monotonic() + limit_s, 0  # and a node the router timed slow is re-timed in 10 s
    with ThreadPoolExecutor(2) as pool:
        while time.monotonic() < deadline:
            for node, rid in pool.map(one, range(2)):
                sent += 1
                if node == node_id:
                    return rid
    raise AssertionError(f"{node_id} served none of {sent} requests in {limit_s} s")


def _balance(rpc: str, token: str, account: str) -> int:
    data = "0x70a08231" + account[2:].lower().rjust(64, "0")  # balanceOf(address)
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "eth_call",
        "params": [{"to": token, "data": data}, "latest"],
    }
    return int(httpx.post(rpc, json=call, timeout=30).json()["result"], 16)


def test_readme_run_a_node_serve_join_and_claim_from_the_operators_folder(tmp_path):
    network_dir, operator_dir = tmp_path / "network", tmp_path / "operator"
    network_dir.mkdir()
    operator_dir.mkdir()
    port, node_port = free_port(), free_port()
    path = f"{BIN}:{os.environ['PATH']}"  # the README's `meritnet` is this checkout's
    net_env = {**os.environ, "COLUMNS": "200", "MERITNET_EPOCH_LENGTH_S": str(EPOCH_S), "PATH": path}
    proc, started = start_meritnet_up(["up", "--chain", "anvil", "--port", str(port)], network_dir, net_env)
    serve = None
    try:
        assert "Press Ctrl-C to stop" in started, started[-3000:]
        rpc, contract = re.search(
            r"Audit and claim on it with: --url (http://127\.0\.0\.1:\d+) --contract (0x[0-9a-fA-F]{40})",
            started,
        ).groups()

        # The operator's machine: its own folder, no Ray address or token of the network's.
        password = operator_dir / "passphrase"
        password.write_text("correct horse battery staple\n")
        password.chmod(0o600)
        op_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        op_env |= {"PATH": path, "COLUMNS": "200", "MERITNET_KEY_PASSWORD_FILE": str(password)}
        network = f"http://127.0.0.1:{port}"
        (keygen, serve_cmd, join), rewards_cmd, claim_cmd = _commands()
        serve_cmd = serve_cmd.replace("--port 8100", f"--port {node_port}")
        assert f"--port {node_port}" in serve_cmd

        def run(command: str) -> str:
            command = command.replace("http://127.0.0.1:8000", network).replace("URL", network)
            r = subprocess.run(
                ["bash", "-c", command],
                cwd=operator_dir,
                capture_output=True,
                text=True,
                timeout=300,
                env=op_env,
            )
            assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
            return r.stdout

        run(keygen)
        keystore = operator_dir / "operator.json"
        assert keystore.stat().st_mode & 0o777 == 0o600
        address = to_checksum_address("0x" + json.loads(keystore.read_text())["address"])

        log = open(operator_dir / "serve.log", "w")
        serve = subprocess.Popen(
            ["bash", "-c", f"exec {serve_cmd}"],
            cwd=operator_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=op_env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 600
        while not (operator_dir / ".meritnet-node" / "node.json").is_file() or not _healthy(node_port):
            assert serve.poll() is None and time.monotonic() < deadline, (
                operator_dir / "serve.log"
            ).read_text()[-3000:]
            time.sleep(2)

        joined = run(join)
        assert NODE_ID in joined, joined
        rid = _served_by(port, NODE_ID)

        # Its reward, as the README shows it, once the epoch of its request has settled.
        deadline = time.monotonic() + 300
        while not re.search(r"[1-9]\d* wei", shown := run(rewards_cmd.replace("0xYOU", address))):
            assert time.monotonic() < deadline, (rid, shown)
            time.sleep(3)
        assert NODE_ID in shown

        # The claim is the operator's own transaction: its address needs gas (the README says so); on
        # anvil a faucet is one RPC call.
        fund = {"jsonrpc": "2.0", "id": 1, "method": "anvil_setBalance", "params": [address, hex(10**18)]}
        assert "error" not in httpx.post(rpc, json=fund, timeout=30).json()
        claimed = run(claim_cmd.replace("https://rpc.example", rpc))
        found = re.match(
            rf"claimed (\d+) wei for {address} \(cumulative (\d+) wei through epoch (\d+)\)", claimed
        )
        assert found, claimed
        amount, cumulative, _ = (int(x) for x in found.groups())
        assert amount == cumulative > 0
        assert _balance(rpc, contract, address) == cumulative  # the distributor is the reward token
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        rest = stop_meritnet_up(proc)
    assert proc.returncode == 0, rest[-3000:]


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
