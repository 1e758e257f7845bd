"""Issue 27: an open node at `https://` by name, called at its pinned IP with the name as SNI, as the name
its certificate is verified against, and as Host (cluster/pinned_http.py). Real TLS throughout: a
throwaway CA, real certificates, real HTTPS servers on 127.0.0.1 (tests/support/tls.py); the name
resolves to 127.0.0.1 through admission's resolver seam, the clients trust the CA through SSL_CERT_FILE."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time

import httpx
import pytest
from eth_account import Account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cluster.metering import MemoryUsageSink
from cluster.pinned_http import pinned_client, pinned_request
from cluster.records import NodeLink, NodeSpec
from cluster.registration import OpenNodePolicy, Registration, sign, tls_name_of
from cluster.registry import NodeRegistryCore, _probe_open_nodes
from routing import errors
from routing.admission import Admission
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.selection import load_selector
from tests.support.gateway_fakes import FakeRegistry, actor_handle, node_stats
from tests.support.tls import TestCA, serve_https

NAME = "node.meritnet.test"
CHAIN, NET, SECRET = 31337, "0x" + "cd" * 32, "s3cret"
ALICE = Account.create()
LOOPBACK = OpenNodePolicy(networks=("127.0.0.0/8",), without_validators=True)
_nonce = iter(range(1, 1 << 30))


def node_app(seen: list) -> Starlette:
    """A node that serves the model 'default' and records the authorization of each completion."""

    async def completions(request: Request):
        seen.append(request.headers.get("authorization"))
        if not (await request.json()).get("stream"):
            choice = {"index": 0, "text": "hello", "token_ids": [5, 6], "finish_reason": "stop"}
            usage = {"prompt_tokens": 1, "completion_tokens": 2}
            return JSONResponse({"id": "x", "choices": [choice], "usage": usage})

        async def events():
            choice = {"index": 0, "text": "hello", "token_ids": [5], "finish_reason": "stop"}
            yield "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", lambda _: JSONResponse({"data": [{"id": "default"}]})),
            Route("/health", lambda _: JSONResponse({"status": "ok"})),
        ]
    )


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def named(ca):
    """A node whose certificate names NAME (what Caddy with Let's Encrypt gives an operator)."""
    seen: list = []
    server = serve_https(node_app(seen), *ca.issue(NAME))
    server.seen = seen
    yield server
    server.stop()


@pytest.fixture(scope="module")
def impostor(ca):
    """A node with a valid certificate from the same CA, but for another name."""
    server = serve_https(node_app([]), *ca.issue("other.meritnet.test"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def trust(ca, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))


def join_body(port: int, host: str = NAME) -> dict:
    reg = Registration(
        action="join",
        node_id="n1",
        operator=ALICE.address,
        model="default",
        accelerator="H100",
        endpoint=f"https://{host}:{port}",
        chain_id=CHAIN,
        network_id=NET,
        nonce=next(_nonce),
        expiry=int(time.time()) + 60,
    )
    return sign(reg, ALICE).model_dump()


def admission(core: NodeRegistryCore, resolved: dict[str, str]) -> Admission:
    async def resolve(host: str):  # the DNS answer the join sees, once
        return ipaddress.ip_address(resolved[host]) if host in resolved else None

    return Admission(FakeRegistry(core), CHAIN, NET, {"default": "generate"}, resolve=resolve, own=())


def gateway(link: NodeLink) -> TestClient:
    core = GatewayCore(
        GatewayConfig(),
        load_selector(registry=None),
        {}.__getitem__,
        actor_handle(MemoryUsageSink()),
        registry=None,
    )
    core.nodes.set_links({"a": link})
    core.set_nodes([node_stats("a").model_copy(update={"kind": "open"})])
    return TestClient(build_fastapi(lambda: core))


def _post(client: TestClient, stream: bool = False):
    body = {"model": "default", "prompt": "hi", "max_tokens": 4, "stream": stream}
    return client.post("/v1/completions", json=body)


def test_a_join_by_name_over_https_is_pinned_to_the_ip_and_keeps_the_name(named):
    core = NodeRegistryCore(policy=LOOPBACK)
    del named.sni[:], named.hosts[:]
    answer = asyncio.run(admission(core, {NAME: "127.0.0.1"}).join(join_body(named.port)))
    link = core.links()["n1"]
    assert link == NodeLink(named.ip_url, answer["secret"], NAME)
    # the probe went to the IP and proved the name: SNI and Host are the name, never the address
    assert named.sni and set(named.sni) == {NAME}
    assert named.hosts == [f"{NAME}:{named.port}"] * 2  # /health and /v1/models


def test_the_registry_keeps_the_name_across_a_restart_and_reads_files_from_before_it(tmp_path, named):
    path = tmp_path / "registry.json"
    core = NodeRegistryCore(path, policy=LOOPBACK)
    asyncio.run(admission(core, {NAME: "127.0.0.1"}).join(join_body(named.port)))
    assert NodeRegistryCore(path, policy=LOOPBACK).links() == core.links()
    old = json.loads(path.read_text())
    del old["nodes"][0]["spec"]["tls_name"]  # a file written before names were kept
    path.write_text(json.dumps(old))
    assert NodeRegistryCore(path, policy=LOOPBACK).links()["n1"].tls_name is None


def test_a_certificate_for_another_name_fails_the_join_probe(impostor):
    core = NodeRegistryCore(policy=LOOPBACK)
    with pytest.raises(errors.APIError) as refused:
        asyncio.run(admission(core, {NAME: "127.0.0.1"}).join(join_body(impostor.port)))
    assert (refused.value.status, refused.value.code) == (422, "probe_failed")
    assert core.links() == {} and impostor.hosts == []  # no request was sent to it


def test_a_completion_reaches_the_https_node_by_its_name(named):
    del named.sni[:], named.hosts[:], named.seen[:]
    with gateway(NodeLink(named.ip_url, SECRET, NAME)) as client:
        plain, streamed = _post(client), _post(client, stream=True)
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == "hello"
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert named.seen == [f"Bearer {SECRET}"] * 2
    assert set(named.sni) == {NAME} and named.hosts == [f"{NAME}:{named.port}"] * 2


def test_a_node_whose_certificate_names_another_host_is_never_sent_the_request(impostor):
    del impostor.hosts[:]
    with gateway(NodeLink(impostor.ip_url, SECRET, NAME)) as client:
        r = _post(client)
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_failed"
    assert impostor.hosts == []


def test_without_the_name_the_pinned_ip_fails_verification(named):
    """What issue 27 was: a certificate names the host, not the IP the network pinned."""
    del named.hosts[:]
    with gateway(NodeLink(named.ip_url, SECRET)) as client:
        assert _post(client).status_code == 503
    assert named.hosts == []  # refused at the handshake


def test_an_untrusted_ca_fails_even_with_the_right_name(named, monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_CERT_FILE", str(TestCA(tmp_path).bundle))  # another CA: not the node's
    del named.hosts[:]
    with gateway(NodeLink(named.ip_url, SECRET, NAME)) as client:
        assert _post(client).status_code == 503
    assert named.hosts == []


def test_the_registrys_health_probe_proves_the_name_too(named, impostor):
    async def probe() -> dict[str, int]:
        async with pinned_client() as client:
            return await _probe_open_nodes(
                client,
                {
                    "good": NodeLink(named.ip_url, SECRET, NAME),
                    "impostor": NodeLink(impostor.ip_url, SECRET, NAME),
                    "unnamed": NodeLink(named.ip_url, SECRET),
                },
            )

    assert asyncio.run(probe()) == {"good": 1, "impostor": 0, "unnamed": 0}


# ---- what is recorded, and plain http as before ----


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [
        ("https://node.example.com", "node.example.com"),
        ("https://Node.Example.COM.:8443", "node.example.com"),
        ("http://node.example.com:8100", None),
        ("https://203.0.113.7", None),
        ("https://[2001:db8::1]:8443", None),
        ("https://127.1:8443", None),  # an address in another spelling: resolved and verified as one
        ("https://0x7f000001", None),
    ],
)
def test_the_name_kept_is_an_https_hosts_dns_name(endpoint, name):
    assert tls_name_of(endpoint) == name


@pytest.mark.parametrize("host", ["bad_name.example", "-x.example", "n\u00f6de.example"])
def test_a_host_that_is_no_dns_name_is_refused_before_resolving(host):
    core = NodeRegistryCore(policy=LOOPBACK)
    with pytest.raises(errors.APIError) as refused:
        asyncio.run(admission(core, {host: "127.0.0.1"}).join(join_body(8443, host=host)))
    assert (refused.value.status, refused.value.code) == (422, "endpoint_name")


def test_a_name_belongs_to_an_https_endpoint_only():
    base = {
        "node_id": "n1",
        "operator": ALICE.address,
        "model_id": "default",
        "model_source": "operator",
        "accelerator_type": "H100",
    }
    NodeSpec(**base, endpoint="https://127.0.0.1:8443", tls_name=NAME)
    for endpoint in ("http://127.0.0.1:8100", None):
        with pytest.raises(ValueError, match="tls_name"):
            NodeSpec(**base, endpoint=endpoint, tls_name=NAME)


def test_plain_http_and_ip_endpoints_are_called_as_recorded():
    async def build() -> list[httpx.Request]:
        async with pinned_client() as client:
            return [
                pinned_request(client, "GET", "http://127.0.0.1:8100", "/health"),
                pinned_request(client, "GET", "https://203.0.113.7:443", "/health"),
                pinned_request(client, "GET", "https://203.0.113.7:443", "/health", NAME),
            ]

    http, ip, named = asyncio.run(build())
    assert (str(http.url), http.headers["host"], "sni_hostname" in http.extensions) == (
        "http://127.0.0.1:8100/health",
        "127.0.0.1:8100",
        False,
    )
    assert ip.headers["host"] == "203.0.113.7" and "sni_hostname" not in ip.extensions
    assert (named.url.host, named.url.port or 443) == ("203.0.113.7", 443)  # the connection: the pinned IP
    assert (named.headers["host"], named.extensions["sni_hostname"]) == (NAME, NAME)


def test_a_rejoin_under_another_name_is_live_only_once_probed_again():
    """Same IP and port, another certificate name: not the node the last health probe saw."""
    core = NodeRegistryCore(policy=LOOPBACK)
    spec = NodeSpec(
        node_id="n1",
        operator=ALICE.address,
        model_id="default",
        model_source="operator",
        accelerator_type="H100",
        endpoint="https://127.0.0.1:8443",
        tls_name=NAME,
    )
    core.claim(spec, 1)
    core.join(spec, "s1", 1)
    core.set_liveness({"n1": 1})
    core.claim(spec, 2)
    core.join(spec, "s2", 2)  # a new secret, the same node: stays live
    assert core.snapshot()[0].live
    renamed = spec.model_copy(update={"tls_name": "other.meritnet.test"})
    core.claim(renamed, 3)
    core.join(renamed, "s3", 3)
    assert not core.snapshot()[0].live and core.links()["n1"].tls_name == "other.meritnet.test"
