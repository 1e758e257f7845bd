"""Hostile client input (issue 13): each gets its OpenAI-shaped 4xx before any node is called; none
gives a 5xx, none is sent to (or counted against) a node. The gateway still serves afterwards."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from routing.app import build_fastapi
from routing.config import GatewayConfig
from routing.gateway import GatewayCore
from routing.intake import IntakeLimits
from routing.selection import load_selector
from tests.support.gateway_fakes import FakeNode, node_stats

C, CH = "/v1/completions", "/v1/chat/completions"
OK = '{"model":"default","prompt":"hi","max_tokens":2}'
JSON = "application/json"


def _chat(content) -> str:
    return json.dumps({"model": "default", "messages": [{"role": "user", "content": content}]})


CASES = [  # (id, path, raw body, content type, status, error code or None)
    ("deep-nesting", C, "[" * 5000 + "]" * 5000, JSON, 400, "too_deep"),
    (
        "deep-in-field",
        C,
        '{"model":"default","prompt":"hi","logit_bias":' + '{"a":' * 60 + "1" + "}" * 61,
        JSON,
        400,
        "too_deep",
    ),
    (
        "lone-surrogate",
        CH,
        '{"model":"default","messages":[{"role":"user","content":"\\ud800"}]}',
        JSON,
        400,
        "invalid_unicode",
    ),
    ("surrogate-in-key", C, '{"model":"default","prompt":"hi","\\udfff":1}', JSON, 400, "invalid_unicode"),
    ("huge-n", C, '{"model":"default","prompt":"hi","n":5000}', JSON, 400, "invalid_value"),
    ("text-plain", C, OK, "text/plain", 415, "unsupported_media_type"),
    (
        "form",
        C,
        "model=default&prompt=hi",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    ("no-content-type", C, OK, "", 415, "unsupported_media_type"),
    (
        "stream-options-without-stream",
        C,
        '{"model":"default","prompt":"hi","stream_options":{"include_usage":true}}',
        JSON,
        400,
        "invalid_value",
    ),
    ("unknown-content-part", CH, _chat([{"type": "bogus", "x": 1}]), JSON, 400, "invalid_value"),
    ("content-part-not-object", CH, _chat(["just a string"]), JSON, 400, "invalid_value"),
    ("nan", C, '{"model":"default","prompt":"hi","temperature":NaN}', JSON, 400, "invalid_json"),
    ("infinity", C, '{"model":"default","prompt":"hi","temperature":Infinity}', JSON, 400, "invalid_json"),
    ("duplicate-keys", C, '{"model":"default","model":"other","prompt":"hi"}', JSON, 400, "invalid_json"),
    ("invalid-utf8", C, b'{"model":"default","prompt":"\xff\xfe"}', JSON, 400, "invalid_json"),
    ("empty-body", C, "", JSON, 400, "invalid_json"),
    ("top-level-array", C, "[1,2]", JSON, 400, "invalid_json"),
    ("top-level-null", C, "null", JSON, 400, "invalid_json"),
    ("truncated", C, '{"model":"default","prompt":', JSON, 400, "invalid_json"),
    ("null-prompt", C, '{"model":"default","prompt":null}', JSON, 400, "invalid_value"),
    ("null-model", C, '{"model":null,"prompt":"hi"}', JSON, 400, "invalid_value"),
    (
        "wrong-type-max-tokens",
        C,
        '{"model":"default","prompt":"hi","max_tokens":"lots"}',
        JSON,
        400,
        "invalid_value",
    ),
    (
        "huge-max-tokens",
        C,
        '{"model":"default","prompt":"hi","max_tokens":99999999999999999999999}',
        JSON,
        400,
        "invalid_value",
    ),
    (
        "float-overflow",
        C,
        '{"model":"default","prompt":"hi","temperature":1e400}',
        JSON,
        400,
        "invalid_json",
    ),
    (
        "negative-max-tokens",
        C,
        '{"model":"default","prompt":"hi","max_tokens":-1}',
        JSON,
        400,
        "invalid_value",
    ),
    # JSON true is not the integer 1 (vLLM's lax models would read it so, past the gateway's own bounds)
    ("bool-max-tokens", C, '{"model":"default","prompt":"hi","max_tokens":true}', JSON, 400, "invalid_type"),
    (
        "bool-n",
        CH,
        '{"model":"default","messages":[{"role":"user","content":"hi"}],"n":true}',
        JSON,
        400,
        "invalid_type",
    ),
    ("messages-not-list", CH, '{"model":"default","messages":"hi"}', JSON, 400, "invalid_value"),
    (
        "message-wrong-nesting",
        CH,
        '{"model":"default","messages":[[{"role":"user","content":"hi"}]]}',
        JSON,
        400,
        "invalid_value",
    ),
    (
        "giant-string",
        C,
        json.dumps({"model": "default", "prompt": "x" * (5 << 20)}),
        JSON,
        413,
        "request_too_large",
    ),
    ("unknown-model", C, '{"model":"nope","prompt":"hi"}', JSON, 404, "model_not_found"),
    (
        "max-completion-tokens-cap",
        CH,
        '{"model":"default","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":10000000}',
        JSON,
        400,
        "invalid_value",
    ),
]


@pytest.fixture(scope="module")
def gateway():
    node = FakeNode("a")
    core = GatewayCore(
        GatewayConfig(intake=IntakeLimits(max_body_bytes=4 << 20)),
        load_selector(registry=None),
        {"a": node}.__getitem__,
        None,
        registry=None,
    )
    core.set_nodes([node_stats("a")])
    return TestClient(build_fastapi(lambda: core), raise_server_exceptions=False), node, core


@pytest.mark.parametrize(
    ("path", "raw", "ctype", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_input_gets_its_4xx_and_never_reaches_a_node(gateway, path, raw, ctype, status, code):
    client, node, core = gateway
    calls = node.calls
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(path, content=data, headers=headers)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == code, err
    assert node.calls == calls  # refused before any node was called: nothing to count against one
    assert core.selector.timeout_s("a") is not None  # and the node is still in rotation:
    ok = client.post(C, content=OK, headers={"content-type": JSON})
    assert ok.status_code == 200


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    ("raw", "deep"),
    [
        (b"[" * 40 + b"]" * 40, True),
        (b'{"a":"' + b"[" * 100 + b'"}', False),  # brackets inside a string do not nest
        (b'{"a":"\\"' + b"[" * 100 + b'"}', False),  # nor after an escaped quote
        (
            b'{"a":"\\\\",' + b'"b":' + b"[" * 100 + b"]" * 100 + b"}",
            True,
        ),  # an escaped backslash ends nothing
    ],
)
def test_depth_is_found_without_parsing(raw, deep):
    from routing.intake import _too_deep

    assert _too_deep(raw, 32) is deep


@pytest.mark.parametrize("origins", [(), ("https://app.example",)])
def test_cors_is_off_unless_origins_are_configured(origins):
    from routing.app import build_fastapi as build

    core = GatewayCore(
        GatewayConfig(cors_origins=origins),
        load_selector(registry=None),
        {"a": FakeNode("a")}.__getitem__,
        None,
        None,
    )
    core.set_nodes([node_stats("a")])
    client = TestClient(build(lambda: core, core.config.cors_origins))
    r = client.options(
        "/v1/completions", headers={"origin": "https://app.example", "access-control-request-method": "POST"}
    )
    allowed = r.headers.get("access-control-allow-origin")
    assert allowed == ("https://app.example" if origins else None)
    evil = client.options(
        "/v1/completions", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
    )
    assert evil.headers.get("access-control-allow-origin") is None


def test_the_openai_js_sdks_preflight_passes_and_meritnets_headers_are_readable():
    """Issue 30: the official openai JS SDK sends x-stainless-* headers; its preflight must pass for a
    listed origin, and a page must be able to read which node served and the request id."""
    from routing.app import build_fastapi as build

    core = GatewayCore(
        GatewayConfig(cors_origins=("https://app.example",)),
        load_selector(registry=None),
        {"a": FakeNode("a")}.__getitem__,
        None,
        None,
    )
    core.set_nodes([node_stats("a")])
    client = TestClient(build(lambda: core, core.config.cors_origins))
    asked = "authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-retry-count"
    r = client.options(
        "/v1/chat/completions",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": asked,
        },
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    allowed = r.headers["access-control-allow-headers"].lower()
    assert all(h.strip() in allowed for h in asked.split(","))
    got = client.get("/v1/models", headers={"origin": "https://app.example"})
    exposed = got.headers["access-control-expose-headers"].lower()
    assert "x-meritnet-node" in exposed and "x-meritnet-request-id" in exposed
