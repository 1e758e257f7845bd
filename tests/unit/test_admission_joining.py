"""Issue 28, joining: what a stranger's signed join can and cannot make the gateway do
(routing/admission.py, cluster/registration.py OpenNodePolicy, cluster/registry.py claims and owners)."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import json
import threading

import pytest
from eth_account import Account

from cluster.records import NodeSpec
from cluster.registration import (
    HOP_HEADER,
    SECP256K1_N,
    OpenNodePolicy,
    Registration,
    RegistrationError,
    canonical_ip,
    endpoint_key,
    sign,
    verify,
)
from cluster.registry import NodeRegistryCore
from routing import errors
from routing.admission import Admission, probe, refuse_hop, resolve_once
from tests.support.gateway_fakes import FakeRegistry

CHAIN, NET = 31337, "0x" + "ab" * 32
ALICE, BOB = Account.create(), Account.create()
PUBLIC = ipaddress.ip_address("8.8.8.8")
OPEN = OpenNodePolicy(without_validators=True)  # public addresses only
DEMO = OpenNodePolicy.for_network("127.0.0.1", [8000], without_validators=True)
MODELS = {"default": "generate", "default-embed": "embed"}  # model -> task, as the network's config says
_nonce = iter(range(1, 1 << 30))


def signed(account=ALICE, **fields) -> dict:
    import time

    base = {
        "action": "join",
        "node_id": "n1",
        "operator": account.address,
        "model": "default",
        "accelerator": "H100",
        "endpoint": "http://node.example:8100",
        "chain_id": CHAIN,
        "network_id": NET,
        "nonce": next(_nonce),
        "expiry": int(time.time()) + 60,
    }
    return sign(Registration(**{**base, **fields}), account).model_dump()


class Probe:
    def __init__(self, ok: bool = True, delay_s: float = 0.0) -> None:
        self.ok, self.delay_s, self.seen, self.names = ok, delay_s, [], []

    async def __call__(self, endpoint: str, model: str, tls_name: str | None = None) -> None:
        self.seen.append(endpoint)
        self.names.append(tls_name)
        await asyncio.sleep(self.delay_s)
        if not self.ok:
            raise RegistrationError(422, "probe failed", "probe_failed")


async def fake_resolve(host: str):
    return PUBLIC if host == "node.example" else await resolve_once(host)


def admission(policy: OpenNodePolicy = OPEN, probe=None, own=(), core=None) -> Admission:
    core = core or NodeRegistryCore(policy=policy)
    return Admission(
        FakeRegistry(core), CHAIN, NET, MODELS, resolve=fake_resolve, own=own, probe=probe or Probe()
    )


def refused(coro) -> tuple[int, str, str]:
    with pytest.raises(errors.APIError) as info:
        asyncio.run(coro)
    assert 400 <= info.value.status < 500
    return info.value.status, info.value.code, info.value.message


# ---- 1. the network does not take itself, loopback, private or link-local addresses as a node ----


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[fe80::1]",
        "localhost",
    ],
)
def test_every_spelling_of_a_non_public_address_is_refused(host):
    probe = Probe()
    status, code, message = refused(admission(probe=probe).join(signed(endpoint=f"http://{host}:8100")))
    assert (status, code) == (422, "endpoint_not_public") and "open_node_networks" in message
    assert probe.seen == []  # refused before any connection


def test_the_endpoint_is_resolved_once_and_recorded_at_its_ip():
    probe, core = Probe(), NodeRegistryCore(policy=OPEN)
    answer = asyncio.run(admission(probe=probe, core=core).join(signed(endpoint="https://node.example:8443")))
    assert answer["node_id"] == "n1"
    assert probe.seen == ["https://8.8.8.8:8443"] and core.links()["n1"].endpoint == "https://8.8.8.8:8443"
    # the name stays beside the IP: calls go to the IP and prove the name (SNI, certificate, Host)
    assert probe.names == ["node.example"] and core.links()["n1"].tls_name == "node.example"


def test_an_open_node_serves_its_models_task_as_the_network_configures_it():
    core = NodeRegistryCore(policy=OPEN)
    asyncio.run(admission(core=core).join(signed(node_id="e1", model="default-embed")))
    asyncio.run(
        admission(core=core).join(signed(node_id="g1", model="default", endpoint="http://node.example:8101"))
    )
    tasks = {s.node_id: s.task for s in core.snapshot()}
    assert tasks == {"e1": "embed", "g1": "generate"}


def test_the_demo_default_allows_loopback_but_never_the_gateway_or_rays_ports():
    assert DEMO.networks == ("127.0.0.0/8", "::1/128")
    asyncio.run(admission(DEMO).join(signed(endpoint="http://127.0.0.1:8100")))
    for endpoint in ("http://127.1:8000", "http://[::ffff:127.0.0.1]:8000", "http://127.0.0.1:6379"):
        assert refused(admission(DEMO).join(signed(endpoint=endpoint)))[:2] == (422, "endpoint_reserved")
    # a network served on all interfaces allows no loopback node, and not its own public address+port
    wide = OpenNodePolicy.for_network("0.0.0.0", [8000], without_validators=True)
    assert wide.networks == ()
    assert refused(admission(wide).join(signed(endpoint="http://127.0.0.1:8100")))[1] == "endpoint_not_public"
    own = admission(wide, own=[PUBLIC])
    assert refused(own.join(signed(endpoint="http://node.example:8000")))[1] == "endpoint_reserved"


def test_open_node_networks_let_a_runner_allow_a_private_range():
    lan = OpenNodePolicy(networks=("10.0.0.0/8",), without_validators=True)
    asyncio.run(admission(lan).join(signed(endpoint="http://10.1.2.3:8100")))
    assert (
        refused(admission(lan).join(signed(endpoint="http://192.168.1.1:8100")))[1] == "endpoint_not_public"
    )
    with pytest.raises(ValueError, match="CIDR"):
        OpenNodePolicy(networks=("ten-slash-eight",))


def test_the_registry_itself_takes_only_pinned_allowed_endpoints():
    core = NodeRegistryCore(policy=OPEN)
    for endpoint, code in [
        ("http://node.example:8100", "not_pinned"),
        ("http://127.0.0.1:8100", "endpoint_not_public"),
    ]:
        spec = NodeSpec(
            node_id="n1",
            operator=ALICE.address,
            model_id="default",
            model_source="operator",
            accelerator_type="H100",
            endpoint=endpoint,
        )
        with pytest.raises(RegistrationError) as info:
            core.claim(spec, 1)
        assert info.value.code == code


def test_a_forwarded_request_is_refused_as_a_loop():
    refuse_hop({"content-type": "application/json"})
    with pytest.raises(errors.APIError) as info:
        refuse_hop({HOP_HEADER: "1"})
    assert (info.value.status, info.value.code) == (400, "forwarding_loop")


# ---- 2. the join probe is not a port scanner ----


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(health: int, models: object):
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            status, body = (health, b"{}") if self.path == "/health" else (200, json.dumps(models).encode())
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server, seen


def test_every_probe_failure_gets_the_same_answer_and_the_probe_is_marked():
    good_models = {"object": "list", "data": [{"id": "default"}]}
    cases = [(404, good_models), (500, good_models), (200, {"data": [{"id": "other"}]}), (200, "garbage")]
    answers, servers = set(), []
    try:
        for health, models in cases:
            url, server, seen = _serve(health, models)
            servers.append(server)
            with pytest.raises(RegistrationError) as info:
                asyncio.run(probe(url, "default"))
            answers.add((info.value.status, info.value.code, str(info.value)))
            assert all(h.get(HOP_HEADER) for h in seen)
        with pytest.raises(RegistrationError) as closed:
            asyncio.run(probe("http://127.0.0.1:9", "default"))
        answers.add((closed.value.status, closed.value.code, str(closed.value)))
        url, server, _ = _serve(200, good_models)
        servers.append(server)
        asyncio.run(probe(url, "default"))
    finally:
        for server in servers:
            server.shutdown()
    ((status, code, message),) = answers
    assert (status, code) == (422, "probe_failed") and "/health" in message


def test_one_signed_join_posted_six_times_at_once_is_probed_once():
    probe = Probe(delay_s=0.05)
    gate = admission(probe=probe)
    body = signed()

    async def six():
        return await asyncio.gather(*(gate.join(body) for _ in range(6)), return_exceptions=True)

    results = asyncio.run(six())
    assert probe.seen == ["http://8.8.8.8:8100"]
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sorted(r.code for r in results if isinstance(r, errors.APIError)) == ["replayed"] * 5


def test_a_failed_probe_spends_the_nonce():
    core = NodeRegistryCore(policy=OPEN)
    body = signed()
    refused(admission(probe=Probe(ok=False), core=core).join(body))
    assert refused(admission(core=core).join(body))[1] == "replayed"


# ---- 3. one server, one slot; a cap per operator ----


def test_aliases_of_one_server_hold_one_slot():
    assert (
        endpoint_key("http://[::ffff:127.0.0.1]:80") == endpoint_key("http://127.0.0.1") == ("127.0.0.1", 80)
    )
    core = NodeRegistryCore(policy=DEMO)
    asyncio.run(admission(DEMO, core=core).join(signed(endpoint="http://127.0.0.1:8100")))
    for alias in ("http://127.1:8100", "http://2130706433:8100", "http://[::ffff:127.0.0.1]:8100"):
        body = signed(BOB, node_id="n2", endpoint=alias)
        assert refused(admission(DEMO, core=core).join(body))[:2] == (409, "endpoint_taken")


def test_an_operator_holds_at_most_max_per_operator_open_nodes():
    policy = OpenNodePolicy(networks=("127.0.0.0/8",), max_per_operator=2, without_validators=True)
    core = NodeRegistryCore(policy=policy)
    for i in (1, 2):
        asyncio.run(
            admission(policy, core=core).join(signed(node_id=f"n{i}", endpoint=f"http://127.0.0.{i}:80"))
        )
    third = signed(node_id="n3", endpoint="http://127.0.0.3:80")
    status, code, message = refused(admission(policy, core=core).join(third))
    assert (status, code) == (403, "operator_full") and "leave" in message
    asyncio.run(admission(policy, core=core).join(signed(BOB, node_id="b1", endpoint="http://127.0.0.4:80")))


# ---- 4. one signature per message ----


def _twin(signature: str, s_flip: bool, v: int | None = None) -> str:
    raw = bytearray(bytes.fromhex(signature[2:]))
    s = int.from_bytes(raw[32:64], "big")
    if s_flip:
        raw[32:64] = (SECP256K1_N - s).to_bytes(32, "big")
        raw[64] = 55 - raw[64]  # 27 <-> 28
    if v is not None:
        raw[64] = v
    return "0x" + raw.hex()


def test_the_high_s_twin_and_v_0_or_1_are_refused():
    from eth_account.messages import encode_typed_data

    from cluster.registration import SignedRegistration, typed_data

    good = SignedRegistration.model_validate(signed())
    assert verify(good, CHAIN, NET).operator == ALICE.address
    message = encode_typed_data(full_message=typed_data(good.registration))
    twin = _twin(good.signature, s_flip=True)
    assert Account.recover_message(message, signature=bytes.fromhex(twin[2:])) == ALICE.address  # a real twin
    original_v = bytes.fromhex(good.signature[2:])[64]
    for other in (twin, _twin(good.signature, s_flip=False, v=original_v - 27)):
        with pytest.raises(RegistrationError) as info:
            verify(good.model_copy(update={"signature": other}), CHAIN, NET)
        assert info.value.code == "bad_signature" and "EIP-2" in str(info.value)


# ---- 5. a node id never changes hands ----


def test_an_id_freed_by_leave_is_not_for_another_operator_even_after_a_restart(tmp_path):
    path = tmp_path / "registry.json"
    core = NodeRegistryCore(path, policy=DEMO)
    asyncio.run(admission(DEMO, core=core).join(signed(endpoint="http://127.0.0.1:8100")))
    core.leave("n1", ALICE.address, next(_nonce))
    again = NodeRegistryCore(path, policy=DEMO)
    status, code, message = refused(
        admission(DEMO, core=again).join(signed(BOB, endpoint="http://127.0.0.1:8200"))
    )
    assert (status, code) == (409, "node_id_taken") and "pick another" in message
    asyncio.run(admission(DEMO, core=again).join(signed(endpoint="http://127.0.0.1:8200")))  # the owner may


# ---- 6. capacity is capped ----


def test_a_capacity_above_the_cap_is_refused_before_probing():
    probe = Probe()
    status, code, message = refused(admission(probe=probe).join(signed(capacity=65)))
    assert (status, code) == (422, "capacity_too_high") and "64" in message and probe.seen == []
    asyncio.run(admission().join(signed(capacity=64)))


# ---- 7. no validators, no open nodes, unless the runner says so ----


def test_a_network_without_validators_admits_no_open_node_by_default():
    default = OpenNodePolicy.for_network("127.0.0.1", [8000])
    status, code, message = refused(admission(default).join(signed(endpoint="http://127.0.0.1:8100")))
    assert (status, code) == (403, "no_validators") and "open_nodes_without_validators: true" in message
    validated = OpenNodePolicy.for_network("127.0.0.1", [8000], validated=True)
    asyncio.run(admission(validated).join(signed(endpoint="http://127.0.0.1:8100")))
    with pytest.raises(RegistrationError):  # the registry holds the same line on its own
        NodeRegistryCore().policy.admits_open_nodes()


def test_the_networks_default_admits_open_nodes_without_validators_only_on_loopback():
    """NetworkConfig.open_nodes_without_validators None: the demo (loopback) admits, a reachable network
    does not."""
    OpenNodePolicy.for_network("127.0.0.1", [8000], without_validators=None).admits_open_nodes()
    wide = OpenNodePolicy.for_network("0.0.0.0", [8000], without_validators=None)
    with pytest.raises(RegistrationError) as refused_:
        wide.admits_open_nodes()
    assert refused_.value.code == "no_validators"


def test_canonical_ip_gives_one_spelling():
    assert str(canonical_ip("::ffff:10.0.0.1")) == "10.0.0.1"
    assert str(canonical_ip("64:ff9b::a00:1")) == "10.0.0.1"
    with pytest.raises(ValueError):
        canonical_ip("node.example")
