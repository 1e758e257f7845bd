"""`meritnet settlement claim` and the audit commands against a settled ledger on a real node (anvil).

A SettlementService settles four epochs of two operators' usage on anvil; the CLI then claims with
each operator's own key file, as the README's audit loop does, and every way it can go wrong ends in
one clear line and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cluster import UsageRecord
from settlement.actor import SettlementService
from settlement.anvil import Anvil, free_port
from settlement.chain import Chain
from settlement.chain_settings import ChainSettings
from settlement.cli import app
from settlement.config import SettlementConfig
from settlement.keys import SettlerKey

pytestmark = pytest.mark.integration

EPOCH_S = 100.0
EPOCHS = 4


def key_file(tmp_path, key: SettlerKey, mode: int = 0o600):
    path = tmp_path / f"{key.address}.key"
    path.touch(mode=mode)
    path.chmod(mode)
    path.write_text(key.export_hex())
    return path


def cli(*args: str):
    """Run `meritnet settlement ARGS`; whatever happens, it ends with a message, not an exception."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Anvil with four epochs settled: operators a and b earned, `stranger` did not."""
    tmp = tmp_path_factory.mktemp("claim")
    node = Anvil(state_file=tmp / "anvil-state.json").start()
    chain = Chain.connect(ChainSettings(url=node.url))
    settler, a, b, stranger = (SettlerKey.generate() for _ in range(4))
    for key in (settler, a, b, stranger):
        chain.fund(key.address, 10**20)  # operators pay their own claim's gas
    genesis = time.time() - (EPOCHS + 0.5) * EPOCH_S  # epochs 0..3 have ended
    config = SettlementConfig(
        ledger_path=tmp / "usage.db",
        epoch_length_s=EPOCH_S,
        genesis=genesis,
        emission_wei=10**18,
        claim_delay_s=0,  # four epochs in one pass; the veto window has tests of its own below
    )
    service = SettlementService(config, ChainSettings(url=node.url), key_file=str(key_file(tmp, settler)))
    service.ledger.append(
        [
            UsageRecord(
                request_id=f"r{epoch}-{i}",
                node_id=f"node-{i % 2}",
                operator=(a, b)[i % 2].address,
                model="m",
                prompt_tokens=3 + i,
                completion_tokens=5,
                started_at=genesis,
                ended_at=genesis + epoch * EPOCH_S + i,
                status="ok",
            )
            for epoch in range(EPOCHS)
            for i in range(4)
        ]
    )
    assert service.tick() == list(range(EPOCHS))
    cumulative = service.book.get(EPOCHS - 1).cumulative
    w = SimpleNamespace(
        tmp=tmp,
        node=node,
        chain=service.chain,
        settler=settler,
        a=a,
        b=b,
        stranger=stranger,
        cumulative=cumulative,
        ledger=["--ledger", str(config.ledger_path)],
        at=["--url", node.url, "--contract", service.chain.address],
    )
    yield w
    node.stop()


def test_claim_mints_the_cumulative_reward_once(world):
    w = world
    a = w.a.address
    owed = w.cumulative[a]
    assert owed > 0 and w.chain.balance_of(a) == 0

    first = cli("claim", "--operator-key-file", key_file(w.tmp, w.a), *w.ledger, *w.at)
    assert first.exit_code == 0, first.output
    assert f"claimed {owed} wei for {a} (cumulative {owed} wei through epoch {EPOCHS - 1})" in first.output
    tx = first.output.split("in tx ")[1].split()[0]
    receipt = w.chain.w3.eth.get_transaction_receipt(tx)
    assert receipt["status"] == 1 and receipt["from"] == a  # signed and paid by the operator itself
    assert w.chain.balance_of(a) == owed == w.chain.claimed(a)

    again = cli("claim", "--operator-key-file", key_file(w.tmp, w.a), *w.ledger, *w.at)
    assert again.exit_code == 0, again.output
    assert "nothing to claim" in again.output and w.chain.balance_of(a) == owed


def test_each_operator_claims_its_own(world):
    w = world
    b = w.b.address
    result = cli("claim", "--operator-key-file", key_file(w.tmp, w.b), *w.ledger, *w.at)
    assert result.exit_code == 0 and f"claimed {w.cumulative[b]} wei for {b}" in result.output, result.output
    assert w.chain.balance_of(b) == w.cumulative[b]


def test_key_file_readable_by_others_is_refused(world):
    w = world
    loose = w.tmp / "loose" / "op.key"
    loose.parent.mkdir()
    loose.write_text(w.a.export_hex())
    loose.chmod(0o644)
    result = cli("claim", "--operator-key-file", loose, *w.ledger, *w.at)
    assert result.exit_code == 1
    assert "readable by group or others (mode 644)" in result.output and f"chmod 600 {loose}" in result.output
    assert w.a.export_hex().removeprefix("0x") not in result.output  # the key never shows


def test_no_reward_yet(world):
    w = world
    result = cli("claim", "--operator-key-file", key_file(w.tmp, w.stranger), *w.ledger, *w.at)
    assert result.exit_code == 1 and f"no reward yet for {w.stranger.address}" in result.output, result.output


def test_wrong_contract(world):
    w = world
    ours = key_file(w.tmp, w.b)
    nowhere = cli(
        "claim", "--operator-key-file", ours, *w.ledger, "--url", w.node.url, "--contract", w.a.address
    )
    assert nowhere.exit_code == 1 and f"no contract at {w.a.address}" in nowhere.output, nowhere.output

    # Another distributor on the same chain: first with nothing settled, then with a root of its own.
    other = Chain.connect(ChainSettings(url=w.node.url))
    genesis, length = w.chain.epochs()
    other.deploy(w.settler, EPOCHS - 1, 10**19, genesis=genesis, epoch_length=length)
    at_other = ["--url", w.node.url, "--contract", other.address]
    empty = cli("claim", "--operator-key-file", ours, *w.ledger, *at_other)
    assert empty.exit_code == 1 and "no epoch is claimable" in empty.output, empty.output
    other.transact(w.settler, "settle", EPOCHS - 1, b"\1" * 32, b"\2" * 32, 1, 1)
    foreign = cli("claim", "--operator-key-file", ours, *w.ledger, *at_other)
    assert foreign.exit_code == 1 and "is not the one this ledger committed" in foreign.output, foreign.output


def test_chain_unreachable(world):
    w = world
    down = f"http://127.0.0.1:{free_port()}"
    args = ["--url", down, "--contract", w.chain.address]
    result = cli("claim", "--operator-key-file", key_file(w.tmp, w.a), *w.ledger, *args)
    assert result.exit_code == 1 and f"the chain node at {down} is not reachable" in result.output, (
        result.output
    )


def test_audit_commands_read_the_ledger_settings(world, tmp_path):
    """status, export, prove and verify on a ledger whose genesis is not 0, with no --epoch-length."""
    w = world
    status = cli("status", *w.ledger, *w.at)
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert report["last_closed_epoch"] == EPOCHS - 1 and report["next_epoch"] == EPOCHS
    assert report["epoch_length_s"] == EPOCH_S

    out = tmp_path / "usage.json"
    export = cli("export", "--epoch", 2, "--tree", "usage", "--out", out, *w.ledger)
    assert export.exit_code == 0 and "4 leaves" in export.output, export.output
    proof = tmp_path / "proof.json"
    prove = cli("prove", "--epoch", 2, "--request-id", "r2-1", "--out", proof, *w.ledger)
    assert prove.exit_code == 0, prove.output
    verify = cli("verify", proof, *w.at)
    assert verify.exit_code == 0 and verify.output.startswith("VALID: usage leaf of epoch 2"), verify.output

    reward = tmp_path / "reward.json"
    assert (
        cli("prove", "--epoch", EPOCHS - 1, "--operator", w.a.address, "--out", reward, *w.ledger).exit_code
        == 0
    )
    assert cli("verify", reward, *w.at).exit_code == 0

    wrong = cli("status", *w.ledger, "--epoch-length", 60)
    assert wrong.exit_code == 2 and "drop --epoch-length" in wrong.output

    down = cli("verify", proof, "--url", f"http://127.0.0.1:{free_port()}", "--contract", w.chain.address)
    assert down.exit_code == 1 and "is not reachable" in down.output, down.output
