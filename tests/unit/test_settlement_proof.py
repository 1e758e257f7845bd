"""Claims from anywhere: the network serves an account's reward proof (GET /v1/operators/{a}/proof),
and `meritnet settlement claim --network URL` checks it against the root on the in-process EVM
(py-evm via eth-tester) before it sends the claim. No Ray, no ledger on the claimant's side."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from settlement import cli as settlement_cli
from settlement.chain import Chain
from settlement.keys import SettlerKey
from settlement.proofs import ProofRejected, check_reward_proof, reward_proof, settled_reward_proof
from settlement.rewardbook import EpochCommitment, RewardBook
from settlement.trees import reward_tree
from tests.support.settlement_chain import BIG_CAP, ENDED, funded_key, settle

USAGE_ROOT = b"\x01" * 32


def commitment(epoch: int, cumulative: dict[str, int]) -> EpochCommitment:
    root = bytes.fromhex(reward_tree(cumulative).root[2:])
    return EpochCommitment(epoch, USAGE_ROOT, root, 3, sum(cumulative.values()), 0, cumulative)


@pytest.fixture(scope="module")
def world():
    """A distributor with epoch 5 settled: the operator is owed 600 wei, another account 400."""
    chain = Chain.embedded()
    settler, operator = funded_key(chain), funded_key(chain)
    other = funded_key(chain).address
    chain.deploy(settler, first_epoch=5, emission_cap=BIG_CAP, **ENDED)
    c5 = commitment(5, {operator.address: 600, other: 400})
    settle(chain, settler, 5, USAGE_ROOT, c5.reward_root, 3, 1000)
    return chain, settler, operator, other, c5


def served(chain, c, account) -> dict:
    return reward_proof(c, account, contract=chain.address, chain_id=chain.chain_id)


def test_a_served_proof_checks_against_the_onchain_root_and_claims(world):
    chain, _, operator, _, c5 = world
    doc = served(chain, c5, operator.address)
    assert doc["epoch"] == 5 and doc["cumulative_wei"] == "600" and doc["root"] == "0x" + c5.reward_root.hex()
    cumulative, _proof = check_reward_proof(doc, chain, operator.address)
    assert cumulative == 600
    # the same document is what `settlement prove --operator` writes: `settlement verify` reads it too
    assert {"tree", "epoch", "root", "leafEncoding", "value", "proof"} <= set(doc)


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (lambda d, o: {**d, "value": [d["value"][0], "601"]}, "does not verify"),
        (lambda d, o: {**d, "value": [o, d["value"][1]]}, "not for"),
        (lambda d, o: {**d, "root": "0x" + "ab" * 32}, "not the root on-chain"),
        (lambda d, o: {**d, "chain_id": 1}, "chain 1"),
        (lambda d, o: {**d, "contract": "0x" + "22" * 20}, "contract"),
        (lambda d, o: {**d, "tree": "usage"}, "not a reward leaf"),
        (lambda d, o: {"error": "x"}, "not a reward proof"),
    ],
)
def test_a_wrong_proof_is_refused_before_sending(world, tamper, says):
    chain, _, operator, other, c5 = world
    with pytest.raises(ProofRejected, match=says):
        check_reward_proof(tamper(served(chain, c5, operator.address), other), chain, operator.address)


def test_a_stale_epochs_proof_is_refused(world):
    chain, _, operator, other, _c5 = world
    stale = commitment(4, {operator.address: 500, other: 100})
    with pytest.raises(ProofRejected, match="stale or wrong"):
        check_reward_proof(served(chain, stale, operator.address), chain, operator.address)


def test_the_proof_of_the_last_settled_epoch_from_the_book(world, tmp_path):
    chain, _, operator, other, c5 = world
    book = RewardBook(tmp_path / "book.db")
    book.put(c5)
    book.put(commitment(6, {operator.address: 900, other: 400}))  # committed, not on-chain yet
    kw = {"contract": chain.address, "chain_id": chain.chain_id}
    doc = settled_reward_proof(book, 5, operator.address, **kw)
    assert doc["epoch"] == 5 and doc["cumulative_wei"] == "600"
    assert "settled" in settled_reward_proof(book, None, operator.address, **kw)["error"]
    assert "no reward" in settled_reward_proof(book, 5, SettlerKey.generate().address, **kw)["error"]


def test_the_gateway_serves_the_settlement_actors_proof(harness):
    client, _, _ = harness
    account = SettlerKey.generate().address
    proof = {"operator": account, "epoch": 5, "root": "0x" + "00" * 32, "value": [account, "1"], "proof": []}

    class Actor:
        async def _prove(address):
            return proof if address == account else {"operator": address, "error": f"{address} has no reward"}

        reward_proof_of = type("M", (), {"remote": staticmethod(_prove)})

    async def named(_name):
        return Actor

    client.core._registry, client.core.refresher.named_actor = object(), named
    r = client.get(f"/v1/operators/{account}/proof")
    assert r.status_code == 200 and r.json() == proof and r.headers["cache-control"] == "no-store"
    stranger = SettlerKey.generate().address
    r = client.get(f"/v1/operators/{stranger}/proof")
    assert r.status_code == 404 and "no reward" in r.json()["error"]["message"]
    assert client.get(f"/v1/operators/{account.lower()}/proof").status_code == 400

    async def none(_name):
        return None

    client.core.refresher.named_actor = none
    r = client.get(f"/v1/operators/{account}/proof")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_settlement"


def test_claim_with_network_only_fetches_checks_and_claims(world, tmp_path, monkeypatch):
    chain, _, operator, _, c5 = world
    key_file = tmp_path / "operator.key"
    key_file.write_text(operator.export_hex())
    key_file.chmod(0o600)
    doc = {**served(chain, c5, operator.address), "rpc_url": "http://rpc.example:8545"}
    asked = []

    def fake_get(url, timeout):
        asked.append(url)
        return httpx.Response(200, json=doc, request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", fake_get)
    monkeypatch.setattr(Chain, "connect", classmethod(lambda cls, settings: chain.at(settings.contract)))
    args = ["claim", "--network", "https://net.example", "--operator-key-file", str(key_file)]
    out = CliRunner().invoke(settlement_cli.app, args)
    assert out.exit_code == 0, out.output
    assert asked == [f"https://net.example/v1/operators/{operator.address}/proof"]
    assert "claimed 600 wei" in out.output and chain.balance_of(operator.address) == 600
    again = CliRunner().invoke(settlement_cli.app, args)
    assert again.exit_code == 0 and "nothing to claim" in again.output

    doc["value"] = [operator.address, "700"]  # a network that lies about the amount: nothing is sent
    lied = CliRunner().invoke(settlement_cli.app, args)
    assert lied.exit_code == 1 and "not sent" in lied.output

    doc["rpc_url"] = None  # no RPC URL named anywhere: told to pass one
    monkeypatch.delenv("MERITNET_CHAIN_URL", raising=False)
    out = CliRunner().invoke(settlement_cli.app, args)
    assert out.exit_code == 1 and "--rpc-url" in out.output


def test_claim_tells_when_a_pending_root_becomes_claimable_and_waits_for_it(tmp_path, monkeypatch):
    """A root in its veto window is not claimable: the CLI says until when (not sent), or, when it is
    due within --wait-s, waits for it and claims."""
    import time

    from tests.support.settlement_chain import next_block_at

    chain = Chain.embedded()
    settler, operator = funded_key(chain), funded_key(chain)
    chain.deploy(settler, first_epoch=5, emission_cap=BIG_CAP, **ENDED, claim_delay=100)
    c5 = commitment(5, {operator.address: 600, funded_key(chain).address: 400})
    settle(chain, settler, 5, USAGE_ROOT, c5.reward_root, 3, 1000)
    until = chain.claimable_at()
    key_file = tmp_path / "operator.key"
    key_file.write_text(operator.export_hex())
    key_file.chmod(0o600)
    doc = {**served(chain, c5, operator.address), "rpc_url": "http://rpc.example:8545"}
    monkeypatch.setattr(
        httpx, "get", lambda url, timeout: httpx.Response(200, json=doc, request=httpx.Request("GET", url))
    )
    monkeypatch.setattr(Chain, "connect", classmethod(lambda cls, settings: chain.at(settings.contract)))
    args = ["claim", "--network", "https://net.example", "--operator-key-file", str(key_file)]

    refused = CliRunner().invoke(settlement_cli.app, [*args, "--wait-s", "10"])
    assert refused.exit_code == 1 and chain.balance_of(operator.address) == 0, refused.output
    assert f"(epoch 5) is pending until unix time {until}" in refused.output

    slept = []
    monkeypatch.setattr(time, "sleep", lambda s: (slept.append(s), next_block_at(chain, until)))
    waited = CliRunner().invoke(settlement_cli.app, [*args, "--wait-s", "200"])
    assert waited.exit_code == 0 and "claimed 600 wei" in waited.output, waited.output
    assert "the reward root of epoch 5 is pending until" in waited.output and slept
