"""Issue 11 on the real network: an operator's open node on the same machine, with its own Ray instance
(own temp dir and ports) and a real vLLM engine, started with `meritnet node serve`, joined with
`meritnet node join` (EIP-712 signed), serves traffic through the gateway, is paid to its signing
address in a settled epoch, then leaves and gets no more traffic. Refused registrations get a 4xx
that says why."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

NODE_ID = "op-1"
MODEL = "open"  # the network meters and verifies it as builtin:default (conftest.py)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def operator(tmp_path_factory):
    """The operator's key file and a node serving MODEL on its own Ray (a separate process tree)."""
    from eth_account import Account

    home = tmp_path_factory.mktemp("operator")
    account = Account.create()
    key_file = home / "operator.key"
    key_file.touch(mode=0o600)
    key_file.write_text(account.key.hex())
    port = free_port()
    # The operator's machine knows nothing of the network's cluster: no token, no address.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "node",
            "serve",
            "--model",
            MODEL,
            "--source",
            "builtin:default",
            "--accelerator",
            "A100",
            "--port",
            str(port),
            "--state-dir",
            str(home / "node"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if (
                httpx.get(f"{endpoint}/health", timeout=2).status_code == 200
                and (home / "node/node.json").is_file()
            ):
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        pytest.fail(f"`meritnet node serve` did not come up:\n{(home / 'serve.log').read_text()[-3000:]}")
    yield {
        "account": account,
        "key_file": key_file,
        "endpoint": endpoint,
        "state": home / "node",
        "home": home,
    }
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _signed(network, account, **fields) -> dict:
    from cluster.registration import Registration, sign

    domain = httpx.get(f"{network.base_url}/v1/nodes/domain", timeout=30).json()
    base = {
        "operator": account.address,
        "chain_id": domain["chain_id"],
        "network_id": domain["network_id"],
        "nonce": time.time_ns(),
        "expiry": int(time.time()) + 60,
    }
    return sign(Registration(**{**base, **fields}), account).model_dump()


def _listed(network) -> dict:
    return {n["node_id"]: n for n in httpx.get(f"{network.base_url}/v1/nodes", timeout=30).json()["data"]}


def test_the_node_refuses_anyone_without_the_network_secret(operator):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert (
        httpx.post(f"{operator['endpoint']}/v1/completions", json=body, timeout=30).status_code == 503
    )  # not joined yet
    assert httpx.get(f"{operator['endpoint']}/v1/models", timeout=30).json()["data"][0]["id"] == MODEL


def test_join_with_the_cli(network, operator):
    done = _cli(
        "node", "join", "--network", network.base_url, "--node-id", NODE_ID,
        "--key-file", str(operator["key_file"]), "--state-dir", str(operator["state"]),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert operator["account"].address in done.stdout
    secret = operator["state"] / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    wait_until(lambda: _listed(network).get(NODE_ID, {}).get("live"), timeout_s=60, interval_s=0.5)
    node = _listed(network)[NODE_ID]
    assert (node["kind"], node["operator"], node["model_id"], node["accelerator_type"]) == (
        "open", operator["account"].address, MODEL, "A100",
    )  # fmt: skip
    listed = _cli("node", "list", "--network", network.base_url)
    assert NODE_ID in listed.stdout and "open" in listed.stdout
    wrong = httpx.post(
        f"{operator['endpoint']}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
        headers={"authorization": "Bearer not-the-secret"},
        timeout=30,
    )
    assert wrong.status_code == 401


def test_it_serves_traffic_through_the_gateway(network, operator, usage_records):
    from openai import OpenAI

    client = OpenAI(base_url=f"{network.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    time.sleep(1.0)  # the gateway's links refresh every 0.5 s
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert raw.headers["x-meritnet-node"] == NODE_ID
    answer = raw.parse()
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    with client.completions.with_streaming_response.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    ) as streamed:
        chunks = list(streamed.parse())
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 0
    # Validators' challenges of the new node are metered too: look up this test's two requests by id.
    ledger = usage_records()
    records = [ledger[r.headers["x-meritnet-request-id"]] for r in (raw, streamed)]
    assert all(r.node_id == NODE_ID and r.status == "ok" and r.completion_tokens > 0 for r in records)
    assert {r.operator for r in records} == {operator["account"].address}


def test_refused_registrations_say_why(network, operator):
    from eth_account import Account

    account, url = operator["account"], f"{network.base_url}/v1/nodes"
    join = {"action": "join", "model": MODEL, "accelerator": "A100", "endpoint": operator["endpoint"]}
    fresh = _signed(network, account, node_id="op-2", **join)
    tampered = {**fresh, "registration": {**fresh["registration"], "endpoint": "http://127.0.0.1:9"}}
    cases = {
        "bad_signature": tampered,
        "expired": _signed(network, account, node_id="op-2", **join, expiry=int(time.time()) - 1),
        "node_id_taken": _signed(network, Account.create(), node_id=NODE_ID, **join),
        # op-1 is at this endpoint already: one slot per address and port (issue 28), checked before any probe
        "endpoint_taken": _signed(network, account, node_id="op-2", **{**join, "model": "liar"}),
        "wrong_chain": _signed(network, account, node_id="op-2", **join, chain_id=1),
        "wrong_network": _signed(network, account, node_id="op-2", **join, network_id="0x" + "00" * 32),
        "unknown_model": _signed(network, account, node_id="op-2", **{**join, "model": "gpt-9"}),
    }
    # a probe that fails says only that, never what the port answered (issue 28: no port scanner)
    closed = _signed(network, account, node_id="op-2", **{**join, "endpoint": "http://127.0.0.1:9"})
    for code, body in [*cases.items(), ("probe_failed", closed)]:
        answer = httpx.post(url, json=body, timeout=30)
        assert 400 <= answer.status_code < 500 and answer.json()["error"]["code"] == code, (code, answer.text)
    replayed = _signed(network, account, node_id=NODE_ID, **join)
    rejoined = httpx.post(url, json=replayed, timeout=30)
    assert rejoined.status_code == 201  # the owner may re-join: a new secret
    again = httpx.post(url, json=replayed, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "replayed"
    assert "op-2" not in _listed(network)
    # The node takes the new secret from its file without a restart (`node join` writes it there).
    (operator["state"] / "secret").write_text(rejoined.json()["secret"])
    time.sleep(1.0)  # the gateway's links refresh every 0.5 s
    served = httpx.post(
        f"{network.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
        timeout=120,
    )
    assert served.status_code == 200 and served.headers["x-meritnet-node"] == NODE_ID, served.text


def test_it_is_paid_to_the_signing_address_in_a_settled_epoch(network, operator, usage_records):
    from settlement.rewardbook import RewardBook

    records = [r for r in usage_records().values() if r.node_id == NODE_ID]
    epoch = int((max(r.ended_at for r in records) - network.genesis) // network.config.epoch_length_s)
    book = RewardBook(Path(str(network.ledger_path) + ".rewards.sqlite"))

    def settled() -> bool:
        network.settle_due_epochs()
        return book.get(epoch) is not None

    wait_until(settled, timeout_s=network.config.epoch_length_s * 3 + 30, interval_s=0.5)
    address = operator["account"].address
    paid = book.get(epoch).cumulative.get(address, 0)
    assert paid > 0
    # the operator sees it from their own machine, through the network's endpoint
    view = httpx.get(f"{network.base_url}/v1/operators/{address}", timeout=30).json()
    assert int(view["rewards"]["cumulative_wei"]) >= paid and [n["node_id"] for n in view["nodes"]] == [
        NODE_ID
    ]
    shown = _cli("node", "rewards", "--network", network.base_url, "--operator", address)
    assert shown.returncode == 0 and NODE_ID in shown.stdout and "wei" in shown.stdout, shown.stdout
    # and the proof it claims with (issue 27): its leaf under the root of the last epoch settled on-chain
    from settlement.merkle import StandardMerkleTree

    url = f"{network.base_url}/v1/operators/{address}/proof"
    wait_until(
        lambda: httpx.get(url, timeout=30).json().get("epoch", -1) >= epoch, timeout_s=60, interval_s=0.5
    )
    doc = httpx.get(url, timeout=30).json()
    cumulative = int(doc["value"][1])
    assert doc["value"][0] == address and cumulative >= paid, doc
    assert StandardMerkleTree.verify(doc["root"], doc["leafEncoding"], [address, cumulative], doc["proof"])
    assert doc["root"] == "0x" + book.get(doc["epoch"]).reward_root.hex(), doc


def test_leave_with_the_cli_and_no_more_traffic(network, operator, usage_records):
    done = _cli(
        "node",
        "leave",
        "--network",
        network.base_url,
        "--node-id",
        NODE_ID,
        "--key-file",
        str(operator["key_file"]),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: NODE_ID not in _listed(network), timeout_s=10, interval_s=0.5)
    time.sleep(1.0)  # the gateway's snapshot refreshes every 0.5 s
    before = len([r for r in usage_records().values() if r.node_id == NODE_ID])
    answer = httpx.post(
        f"{network.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
        timeout=30,
    )
    assert answer.status_code == 404 and json.loads(answer.text)["error"]["code"] == "model_not_found"
    assert len([r for r in usage_records().values() if r.node_id == NODE_ID]) == before
