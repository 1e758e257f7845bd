"""Receipts (issue 31), on the embedded chain (py-evm, no Ray): a settled request's receipt from the
settlement service proves its usage leaf under the usage root the distributor holds; a receipt whose
leaf, billed facts, proof or root was changed is refused; an unsettled request is pending, an unknown
or unbilled one has none."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from cluster import UsageRecord
from settlement.actor import SettlementService
from settlement.config import SettlementConfig
from settlement.keys import SettlerKey
from settlement.receipts import ReceiptRejected, check_receipt

pytestmark = pytest.mark.integration

EPOCH_S = 100.0
# anvil's first dev account: its key is public (anvil prints it); it pays the settles
ANVIL_DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def _bodies(rid: str) -> tuple[bytes, bytes]:
    """What the client of request `rid` sent and got, byte for byte."""
    return f'{{"model":"default","prompt":"{rid}"}}'.encode(), f'{{"id":"{rid}","choices":[]}}'.encode()


def _record(rid: str, operator: str, ended_at: float, status: str = "ok") -> UsageRecord:
    sent, got = _bodies(rid)
    return UsageRecord(
        request_id=rid,
        node_id="h100-a",
        operator=operator,
        model="default",
        prompt_tokens=11,
        completion_tokens=7,
        started_at=ended_at - 1,
        ended_at=ended_at,
        status=status,
        request_hash=hashlib.sha256(sent).hexdigest(),
        response_hash=hashlib.sha256(got).hexdigest(),
    )


def test_a_settled_requests_receipt_proves_its_leaf_on_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("MERITNET_SETTLER_KEY", SettlerKey.generate().export_hex())
    operator = SettlerKey.generate().address
    genesis = float(int(time.time() - 1.5 * EPOCH_S))  # epoch 0 has ended, epoch 1 is running
    service = SettlementService(
        SettlementConfig(
            ledger_path=tmp_path / "ledger.sqlite",
            epoch_length_s=EPOCH_S,
            genesis=genesis,
            claim_delay_s=0,
            public_rpc_url="https://rpc.example",
        )
    )
    ids = [uuid.uuid4().hex for _ in range(4)]
    late = uuid.uuid4().hex
    failed = uuid.uuid4().hex
    service.ledger.append(
        [_record(r, operator, genesis + 5 + i) for i, r in enumerate(ids)]
        + [_record(failed, operator, genesis + 30, status="error"), _record(late, operator, time.time())]
    )
    assert service.receipt_of(ids[0])["status"] == "pending"  # epoch 0 not settled yet
    assert service.tick() == [0]

    doc = service.receipt_of(ids[2])
    assert doc["status"] == "settled" and doc["epoch"] == 0 and doc["contract"] == service.chain.address
    onchain = bytes(service.chain.usage_root(0))
    billed = check_receipt(doc, ids[2], onchain, _bodies(ids[2]))  # the client's own copies match the leaf
    assert (billed["prompt_tokens"], billed["completion_tokens"], billed["node_id"]) == (11, 7, "h100-a")
    with pytest.raises(ReceiptRejected, match="your response body"):
        check_receipt(doc, ids[2], onchain, (_bodies(ids[2])[0], b'{"id":"x","choices":[]}'))

    lies = {
        "another request's": lambda d: d,  # checked as ids[1]
        "billed": lambda d: {**d, "billed": {**d["billed"], "completion_tokens": 70}},
        "hashes": lambda d: {**d, "billed": {**d["billed"], "request_hash": "ab" * 32}},
        "proof": lambda d: {**d, "proof": list(reversed(d["proof"])) or ["0x" + "00" * 32]},
        "root": lambda d: {**d, "root": "0x" + "ab" * 32},
    }
    for says, tamper in lies.items():
        with pytest.raises(ReceiptRejected):
            check_receipt(tamper(doc), ids[1] if says == "another request's" else ids[2], onchain)
    with pytest.raises(ReceiptRejected, match="not the usage root on-chain"):
        check_receipt(doc, ids[2], b"\x01" * 32)

    pending = service.receipt_of(late)
    assert pending["status"] == "pending" and pending["epoch"] == 1 and pending["epoch_ends_at"] > time.time()
    assert "not billed" in service.receipt_of(failed)["error"]
    assert "no usage record" in service.receipt_of(uuid.uuid4().hex)["error"]
    assert service.receipt_of(ids[2]) == doc  # a receipt never changes once given
    # the operator's proof names the chain's public RPC URL: `claim --network` needs nothing else
    proof = service.reward_proof_of(operator)
    assert proof["rpc_url"] == "https://rpc.example" and int(proof["cumulative_wei"]) > 0


def test_receipt_verify_checks_a_served_receipt_against_anvil(tmp_path, monkeypatch):
    """`meritnet receipt verify` as a client runs it: the receipt from the network (here served by a
    stand-in for GET /v1/receipts), the root read from anvil."""
    import httpx
    from typer.testing import CliRunner

    from deploy.cli import app
    from settlement.anvil import Anvil
    from settlement.chain_settings import ChainSettings

    anvil = Anvil(state_file=tmp_path / "anvil-state.json").start()
    try:
        monkeypatch.setenv("MERITNET_SETTLER_KEY", ANVIL_DEV_KEY)
        genesis = float(int(time.time() - 1.5 * EPOCH_S))
        service = SettlementService(
            SettlementConfig(
                ledger_path=tmp_path / "ledger.sqlite",
                epoch_length_s=EPOCH_S,
                genesis=genesis,
                claim_delay_s=0,
            ),
            chain=ChainSettings(url=anvil.url),
        )
        rid, other = uuid.uuid4().hex, uuid.uuid4().hex
        operator = SettlerKey.generate().address
        service.ledger.append([_record(rid, operator, genesis + 5), _record(other, operator, genesis + 6)])
        assert service.tick() == [0]
        served = {"doc": service.receipt_of(rid)}

        def get(url, timeout=None):
            assert url == f"http://net.example/v1/receipts/{rid}"
            return httpx.Response(200, json=served["doc"], request=httpx.Request("GET", url))

        monkeypatch.setattr(httpx, "get", get)
        args = ["receipt", "verify", rid, "--network", "http://net.example", "--rpc-url", anvil.url]
        ok = CliRunner().invoke(app, args)
        assert ok.exit_code == 0 and ok.output.startswith(f"VALID: request {rid} is in epoch 0"), ok.output
        assert "11 prompt + 7 completion tokens of default, served by h100-a" in ok.output
        served["doc"] = {**served["doc"], "billed": {**served["doc"]["billed"], "prompt_tokens": 1}}
        lie = CliRunner().invoke(app, args)
        assert lie.exit_code == 1 and "INVALID" in lie.output, lie.output
    finally:
        anvil.stop()
