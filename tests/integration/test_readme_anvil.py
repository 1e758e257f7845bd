"""The README's chain loops on one `meritnet up --chain anvil`, started as a network runner starts it:

* the audit loop, as a new user runs it: a request served by `h100-a`, and once its epoch has settled,
  the README's settlement commands verbatim (status, export, prove, verify against anvil, claim with the
  operator's key; only the placeholders filled in), and the client's own receipt;
* "Run a node", verbatim, as a new operator runs it (issue 27): in another folder, with none of the
  network's files and its own Ray instance, the README's three commands (keygen, serve, join; only the
  network URL and the port filled in), traffic until the node serves a request, its reward through
  `meritnet node rewards`, then `meritnet settlement claim --network URL` with the operator's keystore:
  the operator's token balance on anvil equals its cumulative reward;
* then Ctrl-C, which stops anvil with the network.

One network for the three (a module fixture; each test stands alone on it): a network start is the
slowest step of the suite on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_utils import to_checksum_address

from settlement.trees import request_key
from tests.support.meritnet_up import start_meritnet_up, stop_meritnet_up
from tests.support.ports import free_port
from tests.support.readme import blocks, section

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
EPOCH_S = 10  # short epochs: a request's epoch settles seconds after it ends
OPERATOR_A = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"  # h100-a's operator in the demo
NODE_ID = "my-node"  # the README's
AUDIT = "## Rewards, on-chain settlement and audits"


@dataclass
class UpNetwork:
    """A running `meritnet up --chain anvil`: its process, what it printed, its folder and environment."""

    proc: subprocess.Popen
    started: str
    port: int
    folder: Path
    env: dict
    url: str  # anvil's RPC
    contract: str


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    folder = tmp_path_factory.mktemp("network")
    port = free_port()
    env = {
        **os.environ,
        "COLUMNS": "200",
        "MERITNET_EPOCH_LENGTH_S": str(EPOCH_S),
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the README's `meritnet` is this checkout's
    }
    proc, started = start_meritnet_up(["up", "--chain", "anvil", "--port", str(port)], folder, env)
    try:
        assert "Press Ctrl-C to stop" in started, started[-3000:]
        printed = re.search(
            r"Audit and claim on it with: --url (http://127\.0\.0\.1:\d+) --contract (0x[0-9a-fA-F]{40})",
            started,
        )
        assert printed, started[-3000:]
        yield UpNetwork(proc, started, port, folder, env, *printed.groups())
    finally:
        if proc.poll() is None:
            stop_meritnet_up(proc)


def _block(marker: str) -> str:
    """The section's bash block that holds `marker`."""
    (block,) = [b for b in blocks(AUDIT, "bash") if marker in b]
    return block


def _audit_block() -> list[str]:
    return _block("L=").splitlines()


def _complete(port: int) -> tuple[str, str, float, float]:
    # a prompt of its own: the router sends a prompt it has seen to the node that holds its prefix
    body = json.dumps({"model": "default", "prompt": f"{uuid.uuid4().hex} Hello", "max_tokens": 8}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    before = time.time()
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return r.headers["x-meritnet-node"], r.headers["x-meritnet-request-id"], before, time.time()


def _served_by_h100(port: int) -> tuple[str, float, float]:
    """Send completions, two at a time and each with a prompt of its own (the router spreads load; one
    at a time, or one prompt, all may go to one node), until h100-a serves one (the README's key is its
    operator's): its request id, and times before and after it, which bound the end time of its record."""
    deadline, sent = time.monotonic() + 60, 0  # a node the router timed slow is re-timed within 10 s
    with ThreadPoolExecutor(2) as pool:
        while time.monotonic() < deadline:
            for node, rid, before, after in pool.map(lambda _: _complete(port), range(2)):
                sent += 1
                if node == "h100-a":
                    return rid, before, after
    raise AssertionError(f"h100-a served none of {sent} requests in 60 s")


def _commands() -> tuple[list[str], str, str]:
    """The README's block (keygen, serve, join), and its `node rewards` and `settlement claim --network`
    commands (written across a bullet's lines: joined)."""
    text = section("## Run a node")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    flat = re.sub(r"\s+", " ", text)
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


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_readme_audit_commands_work_on_anvil(network):
    port, url, contract, env, folder = (
        network.port,
        network.url,
        network.contract,
        network.env,
        network.folder,
    )
    assert f"on the {url} chain" in network.started
    # A client's request as the README sends it, keeping both bodies (its receipt is checked below).
    client = subprocess.run(
        ["bash", "-c", _block("curl").replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=True,
    )
    client_rid = re.search(r"x-meritnet-request-id: (\w+)", client.stdout, re.I).group(1)
    assert json.loads((folder / "response.json").read_bytes())["choices"]
    rid, before, after = _served_by_h100(port)
    genesis = json.loads((folder / ".meritnet" / "state.json").read_text())["genesis"]
    # Its record is in the epoch of its end time, or the next one if it landed as that epoch closed.
    candidates = range(int((before - genesis) // EPOCH_S), int((after - genesis) // EPOCH_S) + 2)

    # The README's block as written: its two assignments (placeholders filled in) and six commands.
    lines = [ln for ln in _audit_block() if ln.strip()]
    assigns = [ln for ln in lines if re.match(r"[A-Z]+=", ln)]
    assigns = [
        ln.replace("http://127.0.0.1:PORT", url).replace("0x...", contract) if ln.startswith("C=") else ln
        for ln in assigns
    ]
    status_cmd, export_cmd, prove_cmd, verify_cmd, key_cmd, claim_cmd = [
        ln for ln in lines if ln not in assigns and not re.match(r"[A-Z]+=", ln)
    ]

    def run(command: str, epoch: int | None = None) -> str:
        if epoch is not None:
            command = command.replace("--epoch 3", f"--epoch {epoch}")
        command = command.replace("<x-meritnet-request-id>", rid)
        r = subprocess.run(
            ["bash", "-c", "\n".join([*assigns, command])],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert r.returncode == 0, (command, r.stdout, r.stderr[-2000:])
        return r.stdout

    deadline = time.monotonic() + 300
    while (status := json.loads(run(status_cmd)))["next_epoch"] <= candidates[-1]:
        assert time.monotonic() < deadline, status  # the request's epoch never settled
        time.sleep(3)
    assert status["contract"] == contract and status["epoch_length_s"] == EPOCH_S

    # The client's own receipt, as the README's sentence has it (issue 31).
    receipt_cmd = re.search(r"`(meritnet receipt verify [^`]+)`", re.sub(r"\s+", " ", section(AUDIT))).group(
        1
    )
    receipt_cmd = receipt_cmd.replace("<x-meritnet-request-id>", client_rid).replace(
        "http://127.0.0.1:8000", f"http://127.0.0.1:{port}"
    )
    receipt_cmd = receipt_cmd.replace("http://127.0.0.1:PORT", url)

    def receipt() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", receipt_cmd],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    # the chain may show the settle a moment before the network's ledger marks it (receipt: pending)
    deadline = time.monotonic() + 60
    while "not settled yet" in (verified := receipt()).stderr and time.monotonic() < deadline:
        time.sleep(3)
    assert verified.returncode == 0, (verified.stdout, verified.stderr[-2000:])
    assert verified.stdout.startswith(f"VALID: request {client_rid} is in epoch "), verified.stdout
    assert "your request and response body matches it" in verified.stdout
    # the ledger's book records an epoch as committed once its settle's receipt is in: after the chain
    deadline = time.monotonic() + 60
    while (status := json.loads(run(status_cmd)))["last_committed_epoch"] < candidates[-1]:
        assert time.monotonic() < deadline, status
        time.sleep(2)

    for epoch in candidates:  # the README's export, per candidate epoch, until it holds the request
        exported = run(export_cmd, epoch)
        assert re.match(r"wrote usage-3\.json: \d+ leaves, root 0x[0-9a-f]{64}", exported), exported
        dump = json.loads((folder / "usage-3.json").read_text())
        if any(v["value"][0] == request_key(rid) for v in dump["values"]):
            break
    else:
        raise AssertionError(f"request {rid} is in no usage tree of epochs {list(candidates)}")

    assert run(prove_cmd, epoch).strip() == "wrote proof.json"
    proof = json.loads((folder / "proof.json").read_text())
    assert proof["tree"] == "usage" and proof["epoch"] == epoch and proof["value"][2] == OPERATOR_A
    verified = run(verify_cmd)
    assert verified.startswith(f"VALID: usage leaf of epoch {epoch} against on-chain root 0x"), verified

    run(key_cmd)
    assert (folder / "anvil-dev-0.key").stat().st_mode & 0o777 == 0o600  # its own file, never operator.key
    claimed = run(claim_cmd)
    found = re.match(
        rf"claimed (\d+) wei for {OPERATOR_A} \(cumulative (\d+) wei through epoch (\d+)\) in tx (0x[0-9a-f]{{64}})",
        claimed,
    )
    assert found, claimed
    amount, cumulative, through, tx = found.groups()
    assert int(amount) == int(cumulative) > 0 and int(through) >= epoch
    receipt = httpx.post(
        url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_getTransactionReceipt", "params": [tx]}
    ).json()["result"]
    assert receipt["status"] == "0x1" and receipt["from"].lower() == OPERATOR_A.lower()
    again = run(claim_cmd)
    assert again.startswith(f"nothing to claim: {OPERATOR_A}"), again


def test_readme_run_a_node_serve_join_and_claim_from_the_operators_folder(network, tmp_path):
    operator_dir = tmp_path / "operator"
    operator_dir.mkdir()
    port, rpc, contract, node_port = network.port, network.url, network.contract, free_port()
    path = network.env["PATH"]
    serve = None
    try:
        # The operator's machine: its own folder, no Ray address or token of the network's.
        password = operator_dir / "passphrase"
        password.write_text("correct horse battery staple\n")
        password.chmod(0o600)
        op_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        op_env |= {"PATH": path, "COLUMNS": "200", "MERITNET_KEY_PASSWORD_FILE": str(password)}
        network_url = f"http://127.0.0.1:{port}"
        (keygen, serve_cmd, join), rewards_cmd, claim_cmd = _commands()
        serve_cmd = serve_cmd.replace("--port 8100", f"--port {node_port}")
        assert f"--port {node_port}" in serve_cmd

        def run(command: str) -> str:
            command = command.replace("http://127.0.0.1:8000", network_url).replace("URL", network_url)
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


def test_ctrl_c_stops_the_network_and_anvil(network):
    rest = stop_meritnet_up(network.proc)
    assert network.proc.returncode == 0 and "Stopped." in rest, rest[-3000:]
    with pytest.raises(httpx.HTTPError):  # stopping the network stopped anvil
        httpx.post(network.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}, timeout=5)
    assert (network.folder / ".meritnet" / "anvil" / "state.json").is_file()
