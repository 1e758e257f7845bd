"""SIGKILL the settlement process after each step, restart it: every epoch settles exactly once.

The settler runs as `python -m settlement run --until-idle` against anvil and a real SQLite ledger;
MERITNET_CRASH_AT=<step> makes it SIGKILL itself the first time it reaches that step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eth_utils import to_checksum_address

from cluster import UsageRecord
from cluster.epochs import Epochs
from settlement.anvil import Anvil
from settlement.chain import Chain
from settlement.chain_settings import ChainSettings
from settlement.keys import SettlerKey
from settlement.ledger import UsageLedger
from settlement.settle_tx import CRASH_STEPS

pytestmark = pytest.mark.integration

EPOCH_S = 100.0
EMISSION = 10**18
OPERATORS = [to_checksum_address(f"0x{i:040x}") for i in (0xA1, 0xB2)]


def make_ledger(path: Path, genesis: float) -> UsageLedger:
    ledger = UsageLedger(path, EPOCH_S, genesis=genesis)
    records = [
        UsageRecord(
            request_id=f"req-{epoch}-{i}",
            node_id=f"node-{i % 4}",
            operator=OPERATORS[(i % 4) % 2],
            model="default",
            prompt_tokens=10 + i,
            completion_tokens=20 + epoch,
            started_at=genesis,
            ended_at=genesis + epoch * EPOCH_S + 1 + i,
            status="ok",
        )
        for epoch in range(3)
        for i in range(5)
    ]
    assert ledger.append(records).accepted == 15
    return ledger


def run_settler(
    env: dict[str, str], ledger_path: Path, crash_at: str | None = None
) -> subprocess.CompletedProcess:
    env = {**env, **({"MERITNET_CRASH_AT": crash_at} if crash_at else {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "settlement",
            "run",
            "--until-idle",
            "--ledger",
            str(ledger_path),
            "--epoch-length",
            str(EPOCH_S),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def network(tmp_path):
    node = Anvil(state_file=tmp_path / "anvil.json").start()
    chain = Chain.connect(ChainSettings(url=node.url))
    key = SettlerKey.generate()
    chain.fund(key.address, 10**20)
    genesis = time.time() - 3.5 * EPOCH_S  # epochs 0, 1, 2 have ended
    chain_genesis, length = Epochs(genesis, EPOCH_S).onchain()
    chain.deploy(key, first_epoch=0, emission_cap=EMISSION, genesis=chain_genesis, epoch_length=length)
    env = {
        **os.environ,
        "MERITNET_CHAIN_URL": node.url,
        "MERITNET_CHAIN_CONTRACT": chain.address,
        "MERITNET_SETTLER_KEY": key.export_hex(),
        "MERITNET_SETTLEMENT_GENESIS": repr(genesis),
        "MERITNET_SETTLEMENT_EMISSION_WEI": str(EMISSION),
    }
    env.pop("MERITNET_CRASH_AT", None)
    yield node, chain, env, tmp_path / "ledger.sqlite", genesis
    node.stop()


def assert_settled_exactly_once(chain: Chain, ledger: UsageLedger) -> None:
    events = chain.settled_events()
    assert [e["epoch"] for e in events] == [0, 1, 2]
    for event in events:
        assert ledger.settled(event["epoch"]) == "0x" + event["tx_hash"].hex()
        assert ledger.pending_tx(event["epoch"]) is None
    assert chain.next_epoch() == 3 and chain.total_rewarded() == 3 * EMISSION


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_sigkill_after_each_step_then_restart(network, step):
    _node, chain, env, ledger_path, genesis = network
    ledger = make_ledger(ledger_path, genesis)
    crashed = run_settler(env, ledger_path, crash_at=step)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert len(chain.settled_events()) <= 1  # it died at the first epoch that reached the step

    restarted = run_settler(env, ledger_path)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert_settled_exactly_once(chain, ledger)
    again = run_settler(env, ledger_path)  # a third run finds nothing to do
    assert again.returncode == 0 and '"settled": []' in again.stdout


def test_cli_proves_and_verifies_against_the_chain(network, tmp_path):
    _node, chain, env, ledger_path, genesis = network
    make_ledger(ledger_path, genesis)
    assert run_settler(env, ledger_path).returncode == 0
    common = ["--ledger", str(ledger_path), "--epoch-length", str(EPOCH_S)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "settlement", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    usage_proof, reward_proof = tmp_path / "usage-proof.json", tmp_path / "reward-proof.json"
    assert (
        cli("prove", "--epoch", "1", "--request-id", "req-1-3", "--out", str(usage_proof), *common).returncode
        == 0
    )
    assert (
        cli(
            "prove", "--epoch", "2", "--operator", OPERATORS[1], "--out", str(reward_proof), *common
        ).returncode
        == 0
    )
    for proof in (usage_proof, reward_proof):
        checked = cli("verify", str(proof))
        assert checked.returncode == 0 and "VALID" in checked.stdout, checked.stdout + checked.stderr
    # Tampering with the amount breaks the proof against the on-chain root.
    doc = json.loads(reward_proof.read_text())
    doc["value"][1] = str(int(doc["value"][1]) + 1)
    reward_proof.write_text(json.dumps(doc))
    bad = cli("verify", str(reward_proof))
    assert bad.returncode == 1 and "INVALID" in bad.stdout
    exported = tmp_path / "usage.json"
    assert cli("export", "--epoch", "0", "--tree", "usage", "--out", str(exported), *common).returncode == 0
    dump = json.loads(exported.read_text())
    assert dump["format"] == "standard-v1" and len(dump["values"]) == 5
    assert dump["tree"][0] == "0x" + chain.usage_root(0).hex()
