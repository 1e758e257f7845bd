"""Signed node registration (cluster/registration.py) and the registry's rules for open nodes."""

from __future__ import annotations

import json
import stat

import pytest
from eth_account import Account

from cluster.records import NodeSpec
from cluster.registration import (
    MAX_VALIDITY_S,
    OpenNodePolicy,
    Registration,
    RegistrationError,
    sign,
    verify,
)
from cluster.registry import NodeRegistryCore

NOW = 1_800_000_000
CHAIN = 31337
NET = "0x" + "ab" * 32
ALICE, BOB = Account.create(), Account.create()


def reg(account=ALICE, **fields) -> Registration:
    base = {
        "action": "join",
        "node_id": "n1",
        "operator": account.address,
        "model": "default",
        "accelerator": "H100",
        "endpoint": "http://127.0.0.1:8100",
        "chain_id": CHAIN,
        "network_id": NET,
        "nonce": 1,
        "expiry": NOW + 60,
    }
    return Registration(**{**base, **fields})


def refusal(call) -> tuple[int, str]:
    with pytest.raises(RegistrationError) as info:
        call()
    return info.value.status, info.value.code


def test_a_signed_registration_recovers_to_its_operator():
    assert verify(sign(reg(), ALICE), CHAIN, NET, now=NOW).operator == ALICE.address


@pytest.mark.parametrize(
    "field,value",
    [
        ("endpoint", "http://203.0.113.9:8100"),
        ("model", "other"),
        ("node_id", "n2"),
        ("capacity", 4096),
        ("nonce", 2),
        ("expiry", NOW + 61),
        ("accelerator", "L4"),
    ],
)
def test_any_change_after_signing_breaks_the_signature(field, value):
    signed = sign(reg(), ALICE)
    tampered = signed.model_copy(
        update={"registration": signed.registration.model_copy(update={field: value})}
    )
    assert refusal(lambda: verify(tampered, CHAIN, NET, now=NOW)) == (401, "bad_signature")


def test_signing_in_someone_elses_name_is_refused():
    assert refusal(lambda: verify(sign(reg(operator=BOB.address), ALICE), CHAIN, NET, now=NOW)) == (
        401,
        "bad_signature",
    )


def test_a_malformed_signature_is_a_refusal_not_a_crash():
    signed = sign(reg(), ALICE).model_copy(update={"signature": "0x" + "00" * 65})
    assert refusal(lambda: verify(signed, CHAIN, NET, now=NOW)) == (401, "bad_signature")


@pytest.mark.parametrize(
    "registration,code",
    [
        (reg(expiry=NOW - 1), "expired"),
        (reg(expiry=NOW + MAX_VALIDITY_S + 1), "expiry_too_far"),
        (reg(chain_id=1), "wrong_chain"),
        (reg(network_id="0x" + "cd" * 32), "wrong_network"),
        (reg(endpoint=""), "incomplete"),
    ],
)
def test_stale_foreign_or_incomplete_registrations_are_refused(registration, code):
    assert refusal(lambda: verify(sign(registration, ALICE), CHAIN, NET, now=NOW)) == (400, code)


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://x",
        "http://",
        "http://u:p@host",
        "http://host/?q=1",
        "http://host/",
        "http://host/v1",
        "http://host:99999",
        "file:///etc/passwd",
        "x" * 300,
    ],
)
def test_endpoints_are_plain_http_urls(endpoint):
    with pytest.raises(ValueError):
        reg(endpoint=endpoint)


def spec(node_id="n1", operator=ALICE.address, endpoint="http://127.0.0.1:8100") -> NodeSpec:
    return NodeSpec(
        node_id=node_id,
        operator=operator,
        model_id="default",
        model_source="operator",
        accelerator_type="H100",
        endpoint=endpoint,
    )


LOCAL = OpenNodePolicy(networks=("127.0.0.0/8",), without_validators=True)


def registry(path=None, **kw) -> NodeRegistryCore:
    return NodeRegistryCore(path, policy=kw.pop("policy", LOCAL), **kw)


def enter(core: NodeRegistryCore, node: NodeSpec, secret: str, nonce: int) -> None:
    """What the gateway does around its probe: claim the nonce, then join under the claim."""
    core.claim(node, nonce)
    core.join(node, secret, nonce)


def test_a_nonce_is_accepted_once_per_operator():
    core = registry()
    enter(core, spec(), "s1", nonce=5)
    core.set_liveness({"n1": 1})
    assert refusal(lambda: enter(core, spec(), "s2", nonce=5)) == (409, "replayed")
    enter(core, spec(), "s2", nonce=6)  # a new secret for the same node: it stays live
    assert core.snapshot()[0].live and core.links()["n1"].secret == "s2"
    assert refusal(lambda: core.leave("n1", ALICE.address, nonce=4)) == (409, "replayed")
    enter(core, spec(endpoint="http://127.0.0.1:8200"), "s3", nonce=7)  # the owner moves the node
    assert core.links()["n1"].endpoint == "http://127.0.0.1:8200" and core.links()["n1"].secret == "s3"
    assert not core.snapshot()[0].live  # live again only once the new endpoint answers its probe


def test_a_node_id_belongs_to_its_operator_and_managed_ids_are_not_for_taking():
    core = registry()
    core.sync([spec("managed-a", endpoint=None)])
    enter(core, spec(), "s", nonce=1)
    assert refusal(lambda: enter(core, spec(operator=BOB.address), "x", nonce=1)) == (409, "node_id_taken")
    assert refusal(lambda: enter(core, spec("managed-a", BOB.address), "x", nonce=1)) == (
        409,
        "node_id_taken",
    )
    assert refusal(lambda: core.leave("n1", BOB.address, nonce=9)) == (409, "node_id_taken")
    assert refusal(lambda: core.leave("nobody", ALICE.address, nonce=9)) == (404, "unknown_node")
    core.leave("n1", ALICE.address, nonce=2)
    assert {s.node_id for s in core.snapshot()} == {"managed-a"}


def test_config_sync_leaves_open_nodes_alone_and_snapshots_carry_no_secret():
    core = registry()
    enter(core, spec(), "top-secret", nonce=1)
    core.sync([spec("managed-a", endpoint=None)])
    core.sync([])
    (stats,) = core.snapshot()
    assert (stats.node_id, stats.kind) == ("n1", "open")
    assert "top-secret" not in stats.model_dump_json()


def test_open_nodes_and_nonces_survive_a_restart_in_an_owner_only_file(tmp_path):
    path = tmp_path / "registry.json"
    core = registry(path)
    enter(core, spec(), "s1", nonce=7)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = registry(path)
    assert again.links()["n1"].secret == "s1"
    assert refusal(lambda: enter(again, spec(), "s2", nonce=7)) == (409, "replayed")


def test_a_registry_file_from_before_open_nodes_still_loads(tmp_path):
    path = tmp_path / "registry.json"
    old = spec("a", endpoint=None)
    path.write_text(json.dumps([{"spec": old.model_dump(mode="json"), "joined_at": 1.0}]))
    assert [s.node_id for s in registry(path).specs()] == ["a"]


def test_one_endpoint_one_node_and_a_bounded_number_of_open_nodes():
    core = registry(max_open_nodes=2)
    enter(core, spec("n1"), "s", nonce=1)
    assert refusal(lambda: enter(core, spec("n2", BOB.address), "x", nonce=1)) == (409, "endpoint_taken")
    enter(core, spec("n2", BOB.address, "http://127.0.0.1:8200"), "x", nonce=2)
    third = spec("n3", BOB.address, "http://127.0.0.1:8300")
    assert refusal(lambda: enter(core, third, "y", nonce=3)) == (403, "network_full")


def test_the_networks_config_wins_a_node_id_an_open_node_took_first():
    core = registry()
    enter(core, spec("planned"), "s", nonce=1)
    core.sync([spec("planned", endpoint=None)])
    (stats,) = core.snapshot()
    assert stats.kind == "managed" and core.links() == {}
