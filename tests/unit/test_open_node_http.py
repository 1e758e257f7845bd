"""The gateway with open nodes over real HTTP (cluster/nodes.py HttpNode, routing/admission.py probe):
real servers on 127.0.0.1 that answer well or lie, no Ray. Every lie ends in a clean client answer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import cluster.nodes
from cluster.metering import MemoryUsageSink
from cluster.records import NodeLink
from cluster.registration import RegistrationError
from routing.admission import probe
from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.selection import load_selector
from tests.support.gateway_fakes import actor_handle, node_stats
from tests.support.ports import free_port

SECRET = "s3cret"


def _event(text: str, finish=None) -> str:
    choice = {"index": 0, "text": text, "token_ids": [5], "finish_reason": finish}
    return "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"


def node_app(model: str = "default", seen: list | None = None) -> Starlette:
    """A node whose behaviour is the prompt's first word; it records the authorization it was sent."""

    async def completions(request: Request):
        if seen is not None:
            seen.append(request.headers.get("authorization"))
        body = await request.json()
        mode = body["prompt"].split(" ")[0]
        if mode == "e400":
            return JSONResponse(
                {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}, 400
            )
        if mode in ("e401", "e429"):
            return JSONResponse({"error": {"message": "no", "code": int(mode[1:])}}, int(mode[1:]))
        if not body.get("stream"):
            choice = {"index": 0, "text": "hello", "token_ids": [5, 6], "finish_reason": "stop"}
            return JSONResponse(
                {"id": "x", "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
            )

        async def events():
            yield _event("hel")
            if mode == "huge":
                yield "data: " + "x" * 5000  # never terminated, larger than the (patched) event cap
                return
            if mode == "cut":
                yield 'data: {"choices": [{"index": 0, "te'  # the connection ends inside an event
                return
            yield _event("lo", "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(_: Request):
        return Response(json.dumps({"data": [{"id": model}]}) if model != "garbage" else "<html>", 200)

    async def health(_: Request):
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
        ]
    )


def serve_http(app) -> tuple[str, uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def nodes():
    seen: list = []
    honest, s1 = serve_http(node_app(seen=seen))
    other, s2 = serve_http(node_app())
    yield {"a": honest, "b": other, "seen": seen}
    s1.should_exit = s2.should_exit = True


@pytest.fixture()
def gateway(nodes, monkeypatch):
    monkeypatch.setattr(cluster.nodes, "MAX_EVENT_BYTES", 1024)
    sink = MemoryUsageSink()
    core = GatewayCore(
        GatewayConfig(), load_selector(registry=None), {}.__getitem__, actor_handle(sink), registry=None
    )
    core.nodes.set_links({n: NodeLink(nodes[n], SECRET) for n in ("a", "b")})
    core.set_nodes([node_stats("a"), node_stats("b")])
    with TestClient(build_fastapi(lambda: core)) as client:
        client.records = lambda: asyncio.run(sink.all())
        yield client


def _post(client, prompt: str, stream: bool = False):
    return client.post(
        "/v1/completions", json={"model": "default", "prompt": prompt, "stream": stream, "max_tokens": 4}
    )


def test_an_open_node_serves_both_ways_with_its_secret_and_gateway_counted_usage(gateway, nodes):
    plain = _post(gateway, "hi")
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == "hello"
    streamed = _post(gateway, "hi", stream=True)
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert "hel" in streamed.text and '"lo"' in streamed.text
    assert {r.status for r in gateway.records()} == {"ok"}
    assert f"Bearer {SECRET}" in nodes["seen"]


@pytest.mark.parametrize("mode", ["huge", "cut"])
def test_an_oversized_or_cut_event_ends_in_a_clean_error_event(gateway, mode):
    r = _post(gateway, f"{mode} please", stream=True)
    events = [e for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and "[DONE]" not in r.text and "xxxx" not in r.text
    assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"
    assert [rec.status for rec in gateway.records()] == ["error"]


def test_a_request_error_from_the_engine_reaches_the_client_as_it_is(gateway):
    r = _post(gateway, "e400 please")
    assert r.status_code == 400 and "prompt too long" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["e401", "e429"])
def test_a_node_refusing_for_reasons_of_its_own_is_a_node_failure_not_the_clients(gateway, mode):
    r = _post(gateway, f"{mode} please")
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_failed"


def test_an_unreachable_node_is_tried_and_the_request_moves_on(nodes, monkeypatch):
    sink = MemoryUsageSink()
    core = GatewayCore(
        GatewayConfig(), load_selector(registry=None), {}.__getitem__, actor_handle(sink), registry=None
    )
    core.nodes.set_links({"a": NodeLink("http://127.0.0.1:9", SECRET), "b": NodeLink(nodes["b"], SECRET)})
    core.set_nodes([node_stats("a"), node_stats("b")])
    with TestClient(build_fastapi(lambda: core)) as client:
        for _ in range(3):
            r = _post(client, "hi")
            assert r.status_code == 200 and r.headers["x-meritnet-node"] == "b"


def test_the_join_probe_checks_health_and_the_claimed_model_and_says_nothing_more(nodes):
    """A wrong model, a closed port and a garbage answer are refused alike: the refusal never tells a
    stranger what a port answered (issue 28: the probe is no port scanner)."""
    asyncio.run(probe(nodes["a"], "default"))
    garbage, server = serve_http(node_app(model="garbage"))
    try:
        refusals = []
        for endpoint, model in (
            (nodes["a"], "llama-70b"),
            ("http://127.0.0.1:9", "default"),
            (garbage, "default"),
        ):
            with pytest.raises(RegistrationError) as refused:
                asyncio.run(probe(endpoint, model))
            refusals.append((refused.value.status, refused.value.code, str(refused.value)))
        assert len(set(refusals)) == 1 and refusals[0][:2] == (422, "probe_failed"), refusals
    finally:
        server.should_exit = True


def test_a_node_that_rejoins_elsewhere_gets_a_new_client_and_others_keep_theirs(nodes):
    directory = cluster.nodes.NodeDirectory(lambda _: SimpleNamespace(options=lambda **_: "serve handle"))
    directory.set_links({"a": NodeLink(nodes["a"], "s1"), "b": NodeLink(nodes["b"], "s2")})
    a, b = directory.client("a"), directory.client("b")
    directory.set_links({"a": NodeLink(nodes["b"], "s3"), "b": NodeLink(nodes["b"], "s2")})
    assert directory.client("a") is not a and directory.client("b") is b
    directory.set_links({})
    assert isinstance(directory.client("a"), cluster.nodes.ServeNode)  # gone from the links: not over HTTP


def test_an_open_node_that_left_between_snapshot_and_links_is_skipped_not_called_by_handle(nodes):
    """The snapshot still lists it (open) but its link is gone: the request moves on, nothing crashes."""
    sink = MemoryUsageSink()
    core = GatewayCore(
        GatewayConfig(), load_selector(registry=None), {}.__getitem__, actor_handle(sink), registry=None
    )
    core.nodes.set_links({"b": NodeLink(nodes["b"], SECRET)})
    core.set_nodes([node_stats("a").model_copy(update={"kind": "open"}), node_stats("b")])
    with TestClient(build_fastapi(lambda: core)) as client:
        for _ in range(3):
            r = _post(client, "hi")
            assert r.status_code == 200 and r.headers["x-meritnet-node"] == "b"


def test_a_400_from_an_open_node_is_tried_elsewhere_before_the_client_sees_it():
    """An open node could refuse valid requests at no cost: its 4xx moves the request on."""
    seen_a, seen_b = [], []
    (a, server_a), (b, server_b) = serve_http(node_app(seen=seen_a)), serve_http(node_app(seen=seen_b))
    try:
        core = GatewayCore(GatewayConfig(), load_selector(registry=None), {}.__getitem__, None, registry=None)
        core.nodes.set_links({"a": NodeLink(a, SECRET), "b": NodeLink(b, SECRET)})
        core.set_nodes([node_stats("a"), node_stats("b")])
        with TestClient(build_fastapi(lambda: core)) as client:
            r = _post(client, "e400 please")  # both nodes refuse it
        assert r.status_code == 400 and "prompt too long" in r.json()["error"]["message"]
        assert len(seen_a) == len(seen_b) == 1  # the client saw the 400 only after both were tried
    finally:
        server_a.should_exit = server_b.should_exit = True


def test_a_gateway_registered_as_a_node_refuses_what_another_gateway_forwards(nodes):
    """Issue 28: a network's own gateway (or any meritnet gateway) admitted as an 'open node' would relay
    requests, loop, and be paid for tokens honest nodes made. Node calls carry x-meritnet-hop, and a
    gateway refuses a request that carries it."""
    inner_calls: list = []
    inner_sink = MemoryUsageSink()
    inner = GatewayCore(
        GatewayConfig(), load_selector(registry=None), {}.__getitem__, actor_handle(inner_sink), registry=None
    )
    inner.nodes.set_links({"real": NodeLink(nodes["b"], SECRET)})
    inner.set_nodes([node_stats("real")])
    inner_app = build_fastapi(lambda: inner)

    @inner_app.middleware("http")
    async def record(request, call_next):
        inner_calls.append(request.url.path)
        return await call_next(request)

    relay, server = serve_http(inner_app)
    try:
        outer = GatewayCore(
            GatewayConfig(),
            load_selector(registry=None),
            {}.__getitem__,
            actor_handle(MemoryUsageSink()),
            registry=None,
        )
        outer.nodes.set_links({"relay": NodeLink(relay, SECRET)})
        outer.set_nodes([node_stats("relay")])
        with TestClient(build_fastapi(lambda: outer)) as client:
            answer = _post(client, "hi")
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "upstream_failed", answer.text
        assert inner_calls == ["/v1/completions"]  # the relay was called once, and refused
        assert asyncio.run(inner_sink.all()) == []  # nothing generated or metered behind it
        with TestClient(inner_app) as direct:
            looped = direct.post(
                "/v1/completions",
                json={"model": "default", "prompt": "hi", "max_tokens": 2},
                headers={"x-meritnet-hop": "1"},
            )
        assert looped.status_code == 400 and looped.json()["error"]["code"] == "forwarding_loop"
    finally:
        server.should_exit = True
