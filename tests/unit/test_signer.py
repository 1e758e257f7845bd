"""The signer process (deploy/signer.py): the control plane's keys live outside Ray, and it signs only
what the settler and the validators sign anyway. A real signer process on a Unix socket, a real
distributor on py-evm."""

from __future__ import annotations

import json
import pickle
import socket
import time

import pytest
from eth_account import Account
from web3 import Web3

from deploy.signer import MAX_REQUEST_BYTES, SETTLER, RemoteSigner, SignerProcess, SignRefused
from scoring.report import ScoreReport, accept_report, sign_report
from settlement.chain import Chain
from settlement.keys import SettlerKey
from tests.support.settlement_chain import BIG_CAP, ENDED


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name in (SETTLER, "v1"):
        path = folder / f"{name}.key"
        path.touch(mode=0o600)
        key = SettlerKey.generate()
        path.write_text(key.export_hex())
        out[name] = (path, key.export_hex())
    return out


@pytest.fixture
def signer(keys, tmp_path_factory):
    sock = tmp_path_factory.mktemp("signer") / "s" / "signer.sock"
    process = SignerProcess(sock, {name: path for name, (path, _) in keys.items()}).start()
    yield sock
    process.stop()


@pytest.fixture
def deployed(signer):
    """An embedded chain whose distributor a fresh signer's settler deployed, set a stake on and
    settled epoch 0 of."""
    chain = Chain.embedded()
    settler = RemoteSigner(signer, SETTLER)
    chain.fund(settler.address, 10**20)
    chain.deploy(settler, first_epoch=0, emission_cap=BIG_CAP, **ENDED)
    chain.transact(settler, "set_stake", Account.create().address, 5)
    assert _settle(chain, settler, 0)["status"] == 1
    return chain, settler


def _settle(chain: Chain, settler: RemoteSigner, epoch: int, tag: str = "") -> dict:
    raw = chain.sign_settle(
        settler,
        epoch,
        Web3.keccak(text=f"u{epoch}{tag}"),
        Web3.keccak(text=f"r{epoch}{tag}"),
        1,
        1,
        chain.nonce(settler.address, "pending"),
        chain.fees(),
    )
    return chain.wait_receipt(chain.send_raw(raw))


def test_the_remote_settler_deploys_and_settles_on_chain(deployed):
    chain, settler = deployed
    assert _settle(chain, settler, 1)["status"] == 1
    assert chain.next_epoch() == 2


def test_the_handle_actors_hold_has_no_secret(signer, keys):
    remote = RemoteSigner(signer, SETTLER)
    blob = pickle.dumps(remote)
    secret = keys[SETTLER][1].removeprefix("0x")
    assert secret.encode() not in blob and bytes.fromhex(secret) not in blob
    assert pickle.loads(blob).address == remote.address == Account.from_key(keys[SETTLER][1]).address


def test_what_the_settler_does_not_sign(deployed):
    chain, settler = deployed
    base = chain._tx_fields(settler.address, chain.nonce(settler.address), chain.fees(), 100_000)
    stranger = Account.create().address
    refused = {
        "ether out": {**base, "to": stranger, "value": 10**18, "data": "0x"},
        "another contract": {**base, "to": stranger, "data": "0x"},
        "a second deploy": {**base, "data": chain.artifact["bytecode"]},
        "another chain": {**base, "chainId": base["chainId"] + 1, "to": chain.address, "data": "0x"},
        "a legacy tx": {**base, "type": 0, "gasPrice": 1, "to": chain.address, "data": "0x"},
        "a fee above the cap": {**base, "maxFeePerGas": 10**15, "to": chain.address, "data": "0x"},
    }
    fn = chain.contract.functions
    calls = {
        "claim": fn.claim(stranger, 1, []),
        "propose_admin": fn.propose_admin(stranger),
        "veto": fn.veto(),
        "set_stake after settling": fn.set_stake(stranger, 1),
    }
    for what, call in calls.items():
        refused[what] = call.build_transaction(base)
    for what, tx in refused.items():
        with pytest.raises(SignRefused):
            settler.sign_transaction(tx)
            pytest.fail(f"signed {what}")


def test_settles_only_move_forward_and_never_change_roots(deployed):
    chain, settler = deployed
    assert _settle(chain, settler, 1)["status"] == 1
    fn = chain.contract.functions
    base = chain._tx_fields(settler.address, chain.nonce(settler.address), chain.fees(), 150_000)
    older = fn.settle(0, Web3.keccak(text="x"), Web3.keccak(text="y"), 1, 1).build_transaction(base)
    other_roots = fn.settle(1, Web3.keccak(text="x"), Web3.keccak(text="y"), 1, 1).build_transaction(base)
    same = fn.settle(1, Web3.keccak(text="u1"), Web3.keccak(text="r1"), 1, 1).build_transaction(base)
    for tx in (older, other_roots):
        with pytest.raises(SignRefused, match="epoch"):
            settler.sign_transaction(tx)
    assert settler.sign_transaction(same)  # a re-sign (new nonce or fee) of what was signed


def test_a_validator_signs_its_own_score_reports_only(signer, keys):
    v1 = RemoteSigner(signer, "v1")
    report = ScoreReport(validator="v1", round=7, issued_at_ms=int(time.time() * 1000))
    text = sign_report(report, v1).model_dump_json()
    assert accept_report(text, "v1", v1.address, 7, time.time(), 60) == ()
    with pytest.raises(SignRefused):
        sign_report(report.model_copy(update={"validator": "v2"}), v1)
    with pytest.raises(SignRefused):
        sign_report(report, RemoteSigner(signer, SETTLER))  # the settler signs transactions only
    with pytest.raises(SignRefused):
        v1.sign_typed_data({"types": {}, "primaryType": "Mail", "domain": {}, "message": {"validator": "v1"}})
    with pytest.raises(SignRefused):
        v1.sign_transaction({"type": 2, "to": v1.address, "value": 1})


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b'{"op": "export", "key": "settler"}',
        b'{"op": "address", "key": "nobody"}',
        b"{}" * 600_000,
    ],
)
def test_garbage_on_the_socket_is_refused_and_the_signer_keeps_serving(signer, line):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(signer))
        try:
            s.sendall(line + b"\n")
            answer = json.loads(s.makefile("rb").readline())
        except (BrokenPipeError, ConnectionResetError):  # an oversized line: cut off after its first MiB
            answer = {"error": "cut off"} if len(line) > MAX_REQUEST_BYTES else None
    assert set(answer) == {"error"}
    assert RemoteSigner(signer, SETTLER).address  # still serving
